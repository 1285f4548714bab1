# Bump on any change a consumer must know about; JSON Schema under captionbus/contracts/schema follows it.
SCHEMA_VERSION = "1"
