# Bump on any change a consumer must know about; JSON Schema under contracts/schema follows it.
SCHEMA_VERSION = "1"
