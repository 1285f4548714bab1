"""`run --replicas N` / `serve STAGE --replicas N` on one CPU host split its cores between the
replicas: two asr workers that each took every core time-sliced instead of decoding side by side."""
from captionbus.stack import replica_threads_env


def test_asr_replicas_share_the_cores():
    assert replica_threads_env("asr", 2, environ={}, cores=2) == {"CAPTIONBUS_ASR_THREADS": "1"}
    assert replica_threads_env("asr", 2, environ={}, cores=16) == {"CAPTIONBUS_ASR_THREADS": "8"}
    assert replica_threads_env("asr", 4, environ={}, cores=2) == {"CAPTIONBUS_ASR_THREADS": "1"}  # never 0


def test_one_replica_or_an_operator_choice_is_left_alone():
    assert replica_threads_env("asr", 1, environ={}, cores=2) == {}
    assert replica_threads_env("asr", 2, environ={"CAPTIONBUS_ASR_THREADS": "2"}, cores=2) == {}
    assert replica_threads_env("asr", 2, environ={"CAPTIONBUS_OPTION_THREADS": "2"}, cores=2) == {}


def test_stages_whose_threads_are_already_per_replica_are_left_alone():
    assert replica_threads_env("vad", 3, environ={}, cores=2) == {}  # 1 thread by default
    assert replica_threads_env("mux", 3, environ={}, cores=2) == {}  # no threads option
