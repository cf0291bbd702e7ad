"""The options table: where each option applies is said once, and parsing obeys it."""

from __future__ import annotations

import pytest

from nvmefs import options
from nvmefs.engine.sink import FOLD_RATE
from nvmefs.options import OPTIONS

# A value each option takes (the flags take none).
VALUES = {
    "sim_size": "1M", "sim_lba": "4096", "sim_ns": "2", "faults": "demo", "seed": "3",
    "sim_abort": "off", "transport": "ioctl", "datapath": "python", "trace_buffer_kb": "64",
    "kernel": "on", "qd": "4", "bs": "4K", "io_timeout": "2", "retries": "1", "log_attempts": "on",
    "workload": "idle", "op": "verify", "passes": "2", "interval": "1", "rate": "5",
    "health_interval": "5", "capacity": "64", "log": "all", "profile": "linux-5.14",
    "format": "seed", "clock": "uptime", "kmsg": "on", "prom": "/tmp/x.prom",
    "prom_interval": "5", "metrics_listen": ":9464", "journal": "/tmp/j.jsonl",
    "journal_size": "1M", "journal_keep": "2", "journal_fsync": "0", "syslog": "/dev/log",
    "backfill": "off",
    "locate": "off",
    "locate_wait": "5",
    "fold": "50",
}  # fmt: skip


def given(name: str) -> list[str]:
    """The -o items that give `name` (and what it needs)."""
    needs = OPTIONS[name].needs
    extra = [f"{needs}={VALUES[needs]}"] if needs else []
    return [*extra, f"{name}={VALUES[name]}"]


def test_every_option_has_a_value_here() -> None:
    assert set(VALUES) == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("command", sorted(options.EVERY_COMMAND))
def test_an_option_is_refused_exactly_by_the_commands_the_table_leaves_out(
    name: str, command: str
) -> None:
    items = given(name)
    refuse = options.refused_by(command)
    if command in OPTIONS[name].commands:
        parsed = options.parse(items, allow_fuse=command == options.MOUNT, refuse=refuse)
        assert name in parsed.given
    else:
        with pytest.raises(options.OptionError, match="does not apply to this command"):
            options.parse(items, allow_fuse=command == options.MOUNT, refuse=refuse)


@pytest.mark.parametrize("name", sorted(OPTIONS))
@pytest.mark.parametrize("kind", sorted(options.EVERY_SOURCE))
def test_an_option_is_refused_exactly_by_the_sources_the_table_leaves_out(
    name: str, kind: str
) -> None:
    o = OPTIONS[name]
    items = given(name)
    if kind == options.DEVICE and o.needs == "kernel":
        items = ["kernel", *items]
    parsed = options.parse(items, allow_fuse=True)
    applies = kind in o.sources and all(
        kind in OPTIONS[other].sources for other in parsed.given if other != name
    )
    if applies:
        assert options.for_source(parsed, kind)[name] == parsed[name]
    else:
        with pytest.raises(options.OptionError):
            options.for_source(parsed, kind)


def test_an_option_that_tunes_another_is_refused_without_it() -> None:
    tuners = [n for n, o in OPTIONS.items() if o.needs and o.needs != "kernel"]
    assert set(tuners) == {"journal_size", "journal_keep", "journal_fsync", "prom_interval"}
    for name in tuners:
        with pytest.raises(options.OptionError, match=f"applies only with {OPTIONS[name].needs}="):
            options.parse([f"{name}={VALUES[name]}"], allow_fuse=True)
    with pytest.raises(options.OptionError, match=r"kernel source \(or -o kernel\) only"):
        options.for_source(options.parse(["trace_buffer_kb=64"], allow_fuse=True), "device")


def test_the_kernel_source_takes_only_an_idle_workload_and_makes_it_the_default() -> None:
    parsed = options.parse([], allow_fuse=True)
    assert parsed["workload"] == "scrub"
    assert options.for_source(parsed, options.KERNEL)["workload"] == "idle"
    with pytest.raises(options.OptionError, match="workload must be idle"):
        options.for_source(options.parse(["workload=scrub"], allow_fuse=True), options.KERNEL)


def test_parsed_options_cannot_be_edited() -> None:
    parsed = options.parse(["qd=4"], allow_fuse=False)
    with pytest.raises(TypeError):
        parsed.values["qd"] = 5  # type: ignore[index]
    again = parsed.with_defaults(qd=9, bs=4096)
    assert (parsed["qd"], parsed["bs"], again["qd"], again["bs"]) == (4, 128 << 10, 4, 4096)


def test_fold_is_a_rate_of_entries_and_0_turns_folding_off() -> None:
    assert options.parse([], allow_fuse=False)["fold"] == FOLD_RATE == 50
    assert options.parse(["fold=0"], allow_fuse=False)["fold"] == 0
    assert options.parse(["fold=0x10"], allow_fuse=False)["fold"] == 16
    for bad, why in [("abc", "'abc' is not a number"), ("-1", "not a number"), ("1.5", "number")]:
        with pytest.raises(options.OptionError, match=f"^option fold={bad}: .*{why}") as e:
            options.parse([f"fold={bad}"], allow_fuse=False)
        assert "\n" not in str(e.value)
