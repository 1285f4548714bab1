"""source_separation: isolate the vocals of a film's soundtrack (htdemucs) before ASR."""
