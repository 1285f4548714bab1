"""Voice activity detection: where in the audio someone speaks (captionbus.contracts.speech.SpeechRegions).

`stage` is the default Silero backend (ONNX via onnxruntime, env common), `pyannote_stage` the
pyannote.audio backend (env pyannote); both share `regions` (post-processing) and `audio`
(block-wise WAV reading)."""
