"""The web toolkit's pieces (captionbus/web) and the gateway's key file, model names and
verbose_json statistics, without a server."""
from __future__ import annotations

import base64

import pytest

from captionbus.gateway.keys import KeyRing, add_key
from captionbus.gateway.openai_format import as_verbose_json
from captionbus.gateway.state import model_name
from captionbus.web.auth import presented_secret, same_secret
from captionbus.web.errors import ApiError, clip
from captionbus.web.listen import ListenError, check_bind, parse_listen
from captionbus.contracts.transcript import Segment, Transcript


def test_listen_addresses_and_the_loopback_rule():
    assert parse_listen("[::1]:8080") == ("::1", 8080) and parse_listen(":9000") == ("127.0.0.1", 9000)
    for bad in ("8080", "host:", "host:99999", "host:http"):
        with pytest.raises(ListenError, match="HOST:PORT"):
            parse_listen(bad)
    for host in ("127.0.0.1", "127.8.9.1", "::1", "[::1]", "localhost"):
        check_bind(host, False, "x", "add a key")
    for host in ("0.0.0.0", "::", "10.0.0.2", "localhost.evil.example", "127.0.0.1.nip.io"):
        with pytest.raises(ListenError, match="without auth: add a key"):
            check_bind(host, False, "x", "add a key")
        check_bind(host, True, "x", "add a key")


def test_presented_secrets_and_messages():
    assert presented_secret("Bearer abc") == "abc" and presented_secret("bearer  abc ") == "abc"
    basic = "Basic " + base64.b64encode(b"ops:tok").decode()
    assert presented_secret(basic) is None and presented_secret(basic, basic=True) == "tok"
    assert presented_secret("Basic !!!", basic=True) is None and presented_secret(None) is None
    assert same_secret("tok", "tok") and not same_secret("tok2", "tok") and not same_secret(None, "tok")
    long = clip("a\nb " + "x" * 10_000)
    assert len(long) == 400 and "\n" not in long and long.endswith("…")
    assert ApiError(404, "no job").kind == "not_found_error" and ApiError(429, "slow").kind == "rate_limit_exceeded"


def test_key_file_marks_admins_and_refuses_malformed_lines(tmp_path):
    keys = tmp_path / "keys"
    alice, ops = add_key(keys, "alice"), add_key(keys, "ops", admin=True)
    ring = KeyRing.load(keys)
    assert ring.caller(alice).name == "alice" and not ring.caller(alice).admin
    assert ring.caller(ops).admin and ring.caller("cbk_nope") is None and ring.caller(None) is None
    assert ring.caller(alice).may_see("alice") and not ring.caller(alice).may_see("ops")
    assert not ring.caller(alice).may_see(None) and ring.caller(ops).may_see(None)  # CLI jobs: admins only
    for line in ("lonely", "bob " + "0" * 64 + " root", "bob xyz"):
        (tmp_path / "bad").write_text(line + "\n")
        with pytest.raises(ValueError, match="bad:1"):
            KeyRing.load(tmp_path / "bad")


def test_model_names_are_what_the_asr_stage_takes_back():
    assert model_name("/home/u/.captionbus/models/whisper-base-ct2 (int8, cpu)") == "whisper-base-ct2"
    assert model_name("Systran/faster-whisper-base (float16, cuda)") == "faster-whisper-base"
    assert model_name("whisper-base-mlx (mlx, cpu)") == "whisper-base-mlx"


def test_verbose_json_never_makes_up_decoder_statistics():
    transcript = Transcript(language="en", duration=2.0, segments=[Segment(start=0.0, end=1.5, text="hello")])
    segment = as_verbose_json(transcript, task="transcribe", granularities=set(), temperature=0.0)["segments"][0]
    assert {k: segment[k] for k in ("tokens", "avg_logprob", "compression_ratio", "no_speech_prob")} == \
        {"tokens": None, "avg_logprob": None, "compression_ratio": None, "no_speech_prob": None}


def test_verbose_json_passes_the_decoders_statistics_through():
    stats = {"tokens": [440, 1702, 13], "avg_logprob": -0.24, "compression_ratio": 1.19, "no_speech_prob": 0.045}
    transcript = Transcript(language="en", duration=2.0, segments=[Segment(start=0.0, end=1.5, text="The quick.", **stats)])
    segment = as_verbose_json(transcript, task="transcribe", granularities={"segment"}, temperature=0.0)["segments"][0]
    assert {k: segment[k] for k in stats} == stats
