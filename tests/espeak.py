"""eSpeak NG speech from the `espeakng-loader` wheel (dev extra): the library and its voice data
come from PyPI, so the tests make speech on a machine without the `espeak-ng` system package.

The wheel ships libespeak-ng (1.52) and espeak-ng-data but no Python API; this module drives the
C API through ctypes the way the `espeak-ng -w` command does (synchronous output, the text's
encoding detected, `[[phonemes]]` allowed, a pause at the end), collects the samples from the
synth callback and writes them as a 16-bit mono WAV at the library's rate (22.05 kHz), the WAV
the tests made with the Debian command before.

Each utterance is made in a child process of its own: the library keeps state between
utterances in one process (two syntheses of the same sentence in a row came out 72667 and 72661
samples long, and neither espeak_Terminate + espeak_Initialize nor reseeding its random
generators made the second equal the first), while the first utterance of a process is the
command's, sample for sample: all eleven test sentences (tests/media.py's FILM_SENTENCES and
ENGLISH_SENTENCE at 150 words a minute, both Hindi sentences at 150 and 130) from this wheel
(1.52) and from Debian's espeak-ng 1.51 `-w` were byte-identical, so Whisper hears exactly what
it heard before and the tests' WER bounds stand as measured. A child per utterance keeps test
media deterministic (the stage cache tests key on the bytes) and costs about 0.1 s (the
command: 0.014 s).
"""
from __future__ import annotations

import ctypes
import subprocess
import sys
import wave
from pathlib import Path

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_POSITION_TYPE and the synth flags of
# speak_lib.h (eSpeak NG 1.52).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE = 1
_POS_CHARACTER = 1
_CHARS_AUTO = 0
_PHONEMES = 0x100
_ENDPAUSE = 0x1000
_EE_OK = 0

_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class SpeechUnavailable(RuntimeError):
    """The espeakng-loader wheel is missing or its library does not load."""


class _Engine:
    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise SpeechUnavailable(
                "test speech needs the espeakng-loader wheel: pip install -e '.[dev]'") from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
            ctypes.c_void_p, ctypes.c_void_p,
        ]
        data = espeakng_loader.get_data_path().encode()
        self.rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if self.rate <= 0:
            raise SpeechUnavailable(f"espeak_Initialize failed ({self.rate}) with data at {data.decode()}")
        self.lib = lib
        self.chunks: list[bytes] = []
        self._callback = _CALLBACK(self._collect)  # kept referenced: the library holds the pointer
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, count: int, _events) -> int:
        if wav and count > 0:
            self.chunks.append(ctypes.string_at(wav, count * 2))
        return 0  # 0: go on synthesising

    def speak(self, text: str, voice: str, words_per_minute: int) -> bytes:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, words_per_minute, 0)
        encoded = text.encode() + b"\0"
        self.chunks = []
        err = self.lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0,
                                    _CHARS_AUTO | _PHONEMES | _ENDPAUSE, None, None)
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({err}) on {text[:40]!r}")
        self.lib.espeak_Synchronize()
        pcm = b"".join(self.chunks)
        if not pcm:
            raise RuntimeError(f"eSpeak NG made no samples for {text[:40]!r}")
        return pcm


def available() -> bool:
    """Whether the espeakng-loader wheel is installed (its library loads in the child)."""
    import importlib.util

    return importlib.util.find_spec("espeakng_loader") is not None


def speak_wav(path: Path, text: str, voice: str = "en", words_per_minute: int = 150) -> Path:
    """`text` spoken by eSpeak NG into `path` (16-bit mono WAV at 22.05 kHz), in a child process."""
    done = subprocess.run(
        [sys.executable, __file__, str(path), voice, str(words_per_minute)],
        input=text.encode(), capture_output=True, timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"eSpeak NG failed on {text[:40]!r} (rc {done.returncode}): "
                           f"{done.stderr.decode(errors='replace')[-2000:]}")
    return path


def _write_wav(path: Path, pcm: bytes, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)


if __name__ == "__main__":
    out, voice_name, wpm = sys.argv[1:4]
    engine = _Engine()
    _write_wav(Path(out), engine.speak(sys.stdin.buffer.read().decode(), voice_name, int(wpm)), engine.rate)
