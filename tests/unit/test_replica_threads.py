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


def test_usable_cores_follow_the_cgroup_quota_and_affinity(tmp_path):
    import os

    from captionbus.core.hardware import usable_cores

    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity  # no quota: the cores this process may run on
    quota.write_text("100000 100000\n")
    assert usable_cores(quota) == 1  # docker --cpus 1
    quota.write_text("50000 100000\n")
    assert usable_cores(quota) == 1  # never 0
    assert usable_cores(tmp_path / "missing") == affinity


def test_replicas_of_a_stage_on_one_host_take_turns_to_load(tmp_path):
    """captionbus/services/runtime/setup_turn.py: with every load slot taken a replica waits (and takes no
    request); a slot is free again once its replica has loaded, or when it dies. Slots: half the
    usable cores, at least one."""
    import asyncio

    from captionbus.core.hardware import usable_cores
    from captionbus.services.runtime.setup_turn import SetupTurn

    async def go():
        first, second, other = (SetupTurn(tmp_path, "asr", 1), SetupTurn(tmp_path, "asr", 1),
                                SetupTurn(tmp_path, "vad", 1))
        assert first.try_take() and not second.try_take()
        assert other.try_take()  # another stage's slots are its own
        stop = asyncio.Event()
        waiting = asyncio.create_task(second.take(stop))
        await asyncio.sleep(0.5)
        assert not waiting.done()  # still the first's slot
        first.release()
        assert await asyncio.wait_for(waiting, 2) is True and second.held
        third = SetupTurn(tmp_path, "asr", 1)
        stop.set()
        assert await third.take(stop) is False  # stopped while waiting
        for turn in (second, third, other):
            turn.release()
        assert SetupTurn(tmp_path, "x").slots == max(1, usable_cores() // 2)
        # Two slots (a 4-core host): two loads at once, the third waits.
        pair = [SetupTurn(tmp_path, "asr", 2) for _ in range(3)]
        assert [t.try_take() for t in pair] == [True, True, False]
        pair[1].release()
        assert pair[2].try_take()
        for turn in pair:
            turn.release()
        (tmp_path / "file").write_text("")
        assert SetupTurn(tmp_path / "file", "asr", 1).try_take()  # no lock possible: load, as before slots

    asyncio.run(go())


def test_a_served_stage_does_not_inherit_the_launcher(monkeypatch, tmp_path):
    """`captionbus serve` from a shell that exported CAPTIONBUS_LAUNCHER=up (an up's service
    environment, copied) must not claim to be up's; up and run set it on their own services."""
    from captionbus.core.settings import Settings
    from captionbus.stack import UP_LAUNCHER, service_env

    LAUNCHER_VARIABLE = "CAPTIONBUS_LAUNCHER"  # what the worker reads (core/settings.py `launcher`)

    monkeypatch.setenv(LAUNCHER_VARIABLE, UP_LAUNCHER)
    settings = Settings(home=tmp_path, nats_url=None, artifacts_mode="local", host_id="h")
    assert LAUNCHER_VARIABLE not in service_env(settings, "common", "nats://127.0.0.1:4222")
    launched = service_env(settings, "common", "nats://127.0.0.1:4222", {LAUNCHER_VARIABLE: "run"})
    assert launched[LAUNCHER_VARIABLE] == "run"


def test_asr_replicas_on_a_cpu_host_are_one_process_of_decoders_sharing_one_load():
    """captionbus.stack.replica_processes: `run --replicas N` / `serve asr --replicas N` on a CPU
    host start one asr process with `workers` N, the cores split between its decoders."""
    from captionbus.stack import replica_processes

    assert replica_processes("asr", 2, environ={}, cores=2, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_WORKERS": "2", "CAPTIONBUS_ASR_THREADS": "1"}]
    assert replica_processes("asr", 4, environ={}, cores=16, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_WORKERS": "4", "CAPTIONBUS_ASR_THREADS": "4"}]
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_THREADS": "1"}, cores=2, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_WORKERS": "2"}]  # the operator's threads stand, per decoder
    assert replica_processes("asr", 1, environ={}, cores=2, kinds=["cpu"]) == [{}]
    # CUDA_VISIBLE_DEVICES-free CPU decoding asked for on a GPU host: shared too
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_DEVICE": "cpu"}, cores=2, kinds=["cpu", "cuda"]) == [
        {"CAPTIONBUS_ASR_WORKERS": "2", "CAPTIONBUS_ASR_THREADS": "1"}]


def test_gpu_and_mlx_hosts_other_stages_and_an_operators_workers_stay_n_processes():
    from captionbus.stack import replica_processes

    assert replica_processes("asr", 2, environ={}, cores=8, kinds=["cpu", "cuda"]) == [
        {"CAPTIONBUS_ASR_THREADS": "4"}] * 2  # one per device (serve --devices pins them)
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_DEVICE": "cuda"}, cores=8, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_THREADS": "4"}] * 2
    assert replica_processes("asr", 2, environ={}, cores=8, kinds=["cpu", "mps", "mlx"]) == [
        {"CAPTIONBUS_ASR_THREADS": "4"}] * 2  # one MLX worker per process
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_WORKERS": "1"}, cores=2, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_THREADS": "1"}] * 2  # the operator asked for processes of one decoder
    # the generic variable that reaches every stage counts as the operator's choice too
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_OPTION_WORKERS": "1"}, cores=2, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_THREADS": "1"}] * 2
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_OPTION_DEVICE": "cuda"}, cores=8, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_THREADS": "4"}] * 2
    # CAPTIONBUS_OPTION_<KEY> wins over the stage's own variable, as the options loader has it
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_BACKEND": "whisperx", "CAPTIONBUS_OPTION_BACKEND": "mlx"},
                             cores=2, kinds=["cpu"]) == [{"CAPTIONBUS_ASR_THREADS": "1"}] * 2
    # the mlx backend asked for on a Linux CPU host: one MLX worker per process (it refuses workers > 1)
    assert replica_processes("asr", 2, environ={"CAPTIONBUS_ASR_BACKEND": "mlx"}, cores=2, kinds=["cpu"]) == [
        {"CAPTIONBUS_ASR_THREADS": "1"}] * 2
    assert replica_processes("subtitle_gen", 2, environ={}, cores=2, kinds=["cpu"]) == [{}, {}]


def test_a_stage_process_runs_its_slots_options_value_of_requests_at_once():
    from captionbus.contracts.declarations.asr import AsrOptions
    from captionbus.services.asr.stage import STAGE as ASR
    from captionbus.services.runtime.serve import process_slots
    from captionbus.services.subtitle_gen.stage import STAGE as SUBTITLES

    assert process_slots(ASR, AsrOptions(workers=3)) == 3
    assert process_slots(ASR, AsrOptions()) == 1
    assert process_slots(SUBTITLES, None) == SUBTITLES.slots
