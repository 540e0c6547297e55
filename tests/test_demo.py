"""The main job: ``cachechain demo``, in process and as the installed command."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
import urllib.request

import pytest

from cachechain import LayerTimeoutError, LayerUnavailableError, MemoryLayer
from cachechain._cli import build_parser, main
from cachechain._demo import DemoOptions, FaultyLayer, run_demo
from tests.support.servers import MemcachedProcess


def test_the_demo_runs_on_the_embedded_default_and_reports_every_layer() -> None:
    out = io.StringIO()
    snap = run_demo(DemoOptions(seconds=0.6, threads=4, keys=500), out)
    text = out.getvalue()
    assert "in-process stand-in" in text
    assert "gets |" in text  # progress lines
    assert "\nL1 " in text and "\nL2 " in text and "\nchain " in text
    ch = snap.chain_metrics
    assert ch.total_hits + ch.total_misses > 0
    assert snap.layer_metrics["L1"].hits > 0
    assert ch.loads > 0


@pytest.mark.parametrize("fault", ["stop", "blackhole"])
def test_the_demo_fault_opens_the_breaker_and_it_closes_again(fault: str) -> None:
    out = io.StringIO()
    snap = run_demo(
        DemoOptions(
            seconds=2.0,
            threads=4,
            keys=500,
            fault=fault,
            fault_at=0.2,
            fault_for=0.3,
            timeout=0.02,
        ),
        out,
    )
    text = out.getvalue()
    assert f"fault on: L2 {fault}" in text and "fault off" in text
    l2 = snap.layer_metrics["L2"]
    assert l2.circuit_opens >= 1
    assert l2.circuit_rejected > 0
    assert "CLOSED -> OPEN" in text
    assert l2.circuit_state == 0, "the breaker should have closed once L2 came back"


@pytest.mark.memcached
def test_the_demo_against_a_real_memcached(memcached: MemcachedProcess) -> None:
    out = io.StringIO()
    snap = run_demo(DemoOptions(seconds=0.6, threads=4, keys=300, memcached=memcached.address), out)
    assert f"memcached {memcached.address}" in out.getvalue()
    assert snap.layer_metrics["L2"].errors == 0
    assert snap.layer_metrics["L2"].hits + snap.layer_metrics["L2"].misses > 0


def test_the_command_line_runs_the_demo(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "0.3", "--threads", "2", "--keys", "100"]) == 0
    assert "gets in" in capsys.readouterr().out


def test_a_bad_memcached_address_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "0.3", "--memcached", "nohost:notaport"]) == 2
    assert "cachechain demo:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args", [["demo", "--seconds", "0"], ["demo", "--threads", "0"], ["demo", "--fault-at", "2"]]
)
def test_bad_options_are_refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_the_demo_options_are_converted_and_checked_with_the_shared_wording(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["demo", "--seconds", "2", "--threads", "3", "--skew", "0.5", "--fault-at", "0.5"]
    args = build_parser().parse_args([*argv, "--timeout", "0.2"])
    assert (args.seconds, args.threads, args.skew, args.fault_at, args.timeout) == (
        2.0,
        3,
        0.5,
        0.5,
        0.2,
    )
    refused = [
        (["--skew", "0"], "argument --skew: the value must be a finite number > 0, got 0.0"),
        (["--timeout", "inf"], "--timeout: the value must be a finite number of seconds > 0"),
        (["--threads", "0"], "argument --threads: the value must be an int >= 1, got 0"),
        (["--keys", "1.5"], "argument --keys: invalid int value: '1.5'"),
        (["--seconds", "soon"], "argument --seconds: invalid float value: 'soon'"),
    ]
    for extra, message in refused:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", *extra])
        assert message in capsys.readouterr().err


def test_python_dash_m_cachechain_demo() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cachechain", "demo", "--seconds", "0.3", "--keys", "100"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "gets in" in done.stdout
    assert done.stderr == ""


class _Watched(io.StringIO):
    """An output stream that signals when the demo prints its /metrics URL."""

    def __init__(self) -> None:
        super().__init__()
        self.url: str | None = None
        self.ready = threading.Event()

    def write(self, text: str) -> int:
        if "Prometheus metrics at " in text:
            self.url = text.split(" at ", 1)[1].strip()
            self.ready.set()
        return super().write(text)


def test_the_demo_serves_prometheus_metrics_that_promtool_accepts() -> None:
    out = _Watched()
    runner = threading.Thread(
        target=run_demo,
        args=(DemoOptions(seconds=2.0, threads=2, keys=200, metrics_port=0), out),
    )
    runner.start()
    try:
        assert out.ready.wait(10), out.getvalue()
        assert out.url is not None
        with urllib.request.urlopen(out.url, timeout=10) as reply:
            body = reply.read()
    finally:
        runner.join(30)
    text = body.decode()
    assert 'cache_chain_requests_total{chain="demo"' in text
    assert 'cache_chain_hits_total{chain="demo",layer="L1"}' in text
    check = subprocess.run(
        ["promtool", "check", "metrics"],
        input=body,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_faulty_layer_fails_every_call_while_a_fault_is_on() -> None:
    inner = MemoryLayer("L2")
    layer = FaultyLayer(inner, timeout=0.01)
    assert layer.local is False and layer.name == "L2" and layer.layer is inner
    layer.set("k", "v")
    layer.fault = "stop"
    with pytest.raises(LayerUnavailableError):
        layer.get("k")
    with pytest.raises(LayerUnavailableError):
        layer.delete("k")
    layer.fault = "blackhole"
    with pytest.raises(LayerTimeoutError):
        layer.get_many(["k"])
    layer.fault = None
    assert layer.get("k") == "v"  # nothing reached the wrapped layer meanwhile
    layer.fault = "blackhole"
    layer.close()  # ends the fault
    assert layer.fault is None
