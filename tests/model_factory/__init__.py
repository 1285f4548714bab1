"""Small randomly initialised models, built locally and saved with each library's own save
path (no weights for these exist offline), so the product's real loading and inference code
runs on them. Each module exposes `ensure_<model>(root) -> Path`: idempotent, builds inside
the env that owns the library, returns the folder the service is pointed at."""
