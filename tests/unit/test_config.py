"""Configuration: defaults in one place, errors as FILE:LINE: what and how to fix."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ctbridge.config import settings as config
from ctbridge.daemon import keepalived
from tests.support import ROOT

GOOD = """
[node]
name = "fw1"
[sync]
local = "192.0.2.1"
peers = ["192.0.2.2"]
key_file = "/etc/ctbridge/sync.key"
"""


def test_defaults_fill_every_key() -> None:
    cfg = config.parse(GOOD, "x.toml")
    assert cfg.sync.port == 3780 and cfg.sync.mode == "reliable" and cfg.apply.mode == "commit"
    assert cfg.control.socket == "/run/ctbridge/ctbridge.sock"
    assert cfg.max_datagram() == 1472
    assert cfg.node_id == config.node_id("fw1")


@pytest.mark.parametrize("text, line, words", [
    (GOOD + "[bogus]\n", 8, "unknown section [bogus]"),
    (GOOD.replace('peers = ["192.0.2.2"]', 'peers = ["192.0.2.2"]\nprot = 1'), 7, "unknown key sync.prot"),
    (GOOD.replace('"192.0.2.1"', '"fw1.example"'), 5, "not an IP address"),
    (GOOD.replace('peers = ["192.0.2.2"]', 'peers = ["192.0.2.2"]\ngroup = "239.1.1.1"'), 7,
     "use unicast peers or a multicast group"),
    (GOOD.replace('key_file = "/etc/ctbridge/sync.key"', ''), 4, "ctbridge keygen"),
    (GOOD + '[apply]\nmode = "later"\n', 9, "use one of 'commit', 'inject'"),
    (GOOD.replace('peers = ["192.0.2.2"]', 'peers = ["2001:db8::2"]'), 6, "different IP versions"),
    (GOOD + '[filter]\naccept = ["10.0.0.0/33"]\n', 9, "not an address or CIDR"),
    (GOOD + '[filter]\ntcp_states = ["OPEN"]\n', 9, "unknown state 'OPEN'"),
    (GOOD + "[sync.more]\n", 0, "unknown key sync.more"),
    ("[node\n", 1, "not valid TOML"),
    (GOOD.replace("3780", "x").replace('key_file', 'port = "3780"\nkey_file'), 7, "sync.port must be an integer"),
])
def test_errors_name_file_line_key_and_fix(text: str, line: int, words: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "/etc/ctbridge/ctbridge.toml")
    first = err.value.problems[0]
    assert all("\n" not in p for p in err.value.problems) and words in first, err.value.problems
    if line:
        assert first.startswith(f"/etc/ctbridge/ctbridge.toml:{line}: "), first


def test_every_problem_of_a_file_is_reported_at_once() -> None:
    """Before, the first problem stopped the check: fix one, run again, find the next."""
    text = (GOOD.replace('"192.0.2.1"', '"fw1.example"').replace("key_file", "port = 70000\nkey_file")
            + '[apply]\nmode = "later"\n[filter]\ntcp_states = ["OPEN"]\n[bogus]\n')
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "c.toml")
    found = err.value.problems
    for words in ("unknown section [bogus]", "sync.local = 'fw1.example' is not an IP address",
                  "apply.mode = 'later'", "unknown state 'OPEN'", "sync.port = 70000"):
        assert sum(words in p for p in found) == 1, (words, found)
    assert str(err.value) == "\n".join(found) and all(p.startswith("c.toml:") for p in found)


def test_sections_are_typed_frozen_records_read_off_one_schema() -> None:
    cfg = config.parse(GOOD)
    assert isinstance(cfg.sync, config.SyncSettings) and cfg.sync.peers == ("192.0.2.2",)
    with pytest.raises(AttributeError):
        cfg.sync.port = 1  # type: ignore[misc]
    for key in config.SCHEMA:  # every key of the schema is a typed field of its section, same default
        section = getattr(cfg, key.section)
        value = getattr(section, key.name)
        if key.default is not None and key.section != "sync" and key.section != "node":
            assert (list(value) if isinstance(value, tuple) else value) == key.default, key


def test_docs_list_every_key_with_its_default() -> None:
    doc = (ROOT / "docs" / "config.md").read_text()
    blocks = re.split(r"^### \[(\w+)\]", doc, flags=re.MULTILINE)
    rows = {(section, key): default for section, body in zip(blocks[1::2], blocks[2::2], strict=True)
            for key, default in re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", body, re.MULTILINE)}
    assert list(dict.fromkeys(s for s, _ in rows)) == list(config.SECTIONS)
    assert set(rows) == {(k.section, k.name) for k in config.SCHEMA}
    for key in config.SCHEMA:
        shown = rows[(key.section, key.name)]
        assert shown == ("(required)" if key.default is None else json.dumps(key.default)), key.name


def test_check_command_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(GOOD + '[apply]\nmode = "later"\n')
    res = subprocess.run([sys.executable, "-m", "ctbridge", "check", "--no-host", "-c", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1 and res.stderr.startswith(f"{path}:9: apply.mode")
    path.write_text(GOOD)
    res = subprocess.run([sys.executable, "-m", "ctbridge", "check", "--no-host", "-c", str(path)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout


@pytest.mark.parametrize("args, expected", [
    (["INSTANCE", "VI_1", "MASTER", "100"], keepalived.Transition("INSTANCE", "VI_1", "MASTER", 100)),
    (["GROUP", "G1", "BACKUP", "0"], keepalived.Transition("GROUP", "G1", "BACKUP", 0)),
    (["fault"], keepalived.Transition("", "", "FAULT", 0)),
    (["INSTANCE", '"VI_2"', "STOP"], keepalived.Transition("INSTANCE", "VI_2", "STOP", 0)),
])
def test_notify_arguments(args: list[str], expected: keepalived.Transition) -> None:
    assert keepalived.parse_args(args) == expected


@pytest.mark.parametrize("args", [[], ["INSTANCE", "VI_1"], ["INSTANCE", "VI_1", "ASLEEP", "1"],
                                  ["INSTANCE", "VI_1", "MASTER", "high"], ["MASTER", "extra"]])
def test_bad_notify_arguments_say_what_is_expected(args: list[str]) -> None:
    with pytest.raises(keepalived.NotifyError, match=r"expected|priority"):
        keepalived.parse_args(args)


def test_fifo_lines() -> None:
    assert keepalived.parse_fifo_line('INSTANCE "VI_1" MASTER 100\n') == keepalived.Transition(
        "INSTANCE", "VI_1", "MASTER", 100)
    assert keepalived.parse_fifo_line('GROUP "G 1" BACKUP 0') == keepalived.Transition("GROUP", "G 1", "BACKUP", 0)
    for other in ('MASTER_RX_LOWER_PRI "VI_1" 100', 'INSTANCE "VI_1" MASTER_PRIORITY 90', "", "garbage"):
        assert keepalived.parse_fifo_line(other) is None


def test_the_notify_hook_knows_the_default_control_socket() -> None:
    """The hook is standalone (it starts without site-packages), so it repeats one default."""
    hook = (ROOT / "hooks" / "ctbridge-notify").read_text()
    default = next(k.default for k in config.SCHEMA if (k.section, k.name) == ("control", "socket"))
    assert f'DEFAULT_SOCKET = "{default}"' in hook
    assert f'DEFAULT_CONFIG = "{config.DEFAULT_PATH}"' in hook


def test_one_table_of_control_commands() -> None:
    """The CLI, its help and the daemon's dispatch all read ctbridge.daemon.control.COMMANDS."""
    from ctbridge import cli
    from ctbridge.cli import control as cli_control
    from ctbridge.daemon import control
    from ctbridge.daemon.handlers import Handlers
    assert set(cli_control.COMMANDS) == set(control.COMMANDS)
    assert all(cli.MODULES[name] == "ctbridge.cli.control" and cli.HELP[name] == text
               for name, text in control.COMMANDS.items())
    # the daemon's dispatch table: a handler for each, named after it
    table = Handlers(None, None, None, dict, lambda: None).table  # type: ignore[arg-type]
    assert set(table) == set(control.COMMANDS)
    assert all(table[name].__name__ == "on_" + name.replace("-", "_") for name in control.COMMANDS)
    assert control.unknown("sleep") == ("unknown command 'sleep'; commands are status, stats, commit, flush, "
                                        "resync, bulk-send, rebuild, diff, dump, notify")


def test_a_refused_value_does_not_bring_false_problems_with_it() -> None:
    """Found by review: after a wrong type or choice the key kept its default, and the checks of
    that default added lines that were not true of the file."""
    for text, only in (
            (GOOD.replace('key_file', 'auth = "md5"\nkey_file').replace('key_file = "/etc/ctbridge/sync.key"', ""),
             "sync.auth = 'md5'"),
            (GOOD.replace('peers = ["192.0.2.2"]', 'peers = "192.0.2.2"'), "sync.peers must be a list"),
            (GOOD.replace('name = "fw1"', "name = 1"), "node.name must be a string")):
        with pytest.raises(config.ConfigError) as err:
            config.parse(text, "c.toml")
        assert len(err.value.problems) == 1 and only in err.value.problems[0], err.value.problems


def test_the_boot_epoch_is_kept_or_the_start_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only or unwritable state, and a file of garbage, were silently ignored: with the clock
    behind, the node then started with an epoch its peers rejected as a replay, for good."""
    from ctbridge.config import host
    state = tmp_path / "state"
    first = host.next_epoch(str(state))
    assert int((state / "epoch").read_text()) == first
    monkeypatch.setattr(host.time, "time_ns", lambda: 1000)  # the clock went back
    second = host.next_epoch(str(state))
    assert second == first + 1
    (state / "epoch").write_text("not a number\n")
    with pytest.raises(host.EpochError, match="not an epoch"):
        host.next_epoch(str(state))
    (state / "epoch").write_bytes(b"\xff\xfe garbage")
    with pytest.raises(host.EpochError, match="not an epoch"):
        host.next_epoch(str(state))
    (state / "epoch").write_text(f"{2**64 - 1}\n")  # the next start's epoch would not fit the wire's u64
    with pytest.raises(host.EpochError, match="out of range"):
        host.next_epoch(str(state))
    blocked = tmp_path / "file"
    blocked.write_text("")  # a state_dir that is a file: cannot be made, cannot be written
    with pytest.raises(host.EpochError, match="cannot be read: Not a directory"):
        host.next_epoch(str(blocked))
    with pytest.raises(host.EpochError, match="cannot be written"):
        host.save_epoch(str(blocked), 5)


def test_a_vip_that_is_no_address_refuses_the_start() -> None:
    """keepalived.vips go into the commit gate's nft script and the restart check: a wrong one is
    said at load, in one line, never when the gate closes."""
    config.parse(GOOD + '[keepalived]\nvips = ["192.0.2.1/24", "2001:db8::1"]\n', "c.toml")
    with pytest.raises(config.ConfigError) as err:
        config.parse(GOOD + '[keepalived]\nvips = ["192.0.2.300/24"]\n', "c.toml")
    assert len(err.value.problems) == 1
    assert "keepalived.vips: '192.0.2.300/24' is not an address" in err.value.problems[0]


@pytest.mark.parametrize(("sync", "other", "words"), [
    ("delay = -1", "", "sync.delay = -1.0: seconds from 0 (off) to 3600"),
    ('delay_by_protocol = ["tcp"]', "", "sync.delay_by_protocol: 'tcp' is not \"PROTOCOL SECONDS\""),
    ('delay_by_protocol = ["quic 3"]', "", "sync.delay_by_protocol: 'quic 3'"),
    ("coalesce = 2", "", "sync.coalesce = 2.0: seconds from 0 (off) to 1"),
    ("delay = 30", '[apply]\nmode = "inject"\ndefer_queue = 7', "sync.delay with apply.defer_queue"),
    ("", '[filter]\nno_sync_marks = ["0x101/0x100"]', "filter.no_sync_marks: '0x101/0x100' is not"),
    ("", '[filter]\nno_sync_marks = ["0x1/0x100000000"]', "filter.no_sync_marks: '0x1/0x100000000'"),
    ("", "[filter]\nno_sync_labels = [128]", "filter.no_sync_labels: 128 is not a ct label bit (0-127)"),
    ("", "[filter]\nno_sync_zones = [70000]", "filter.no_sync_zones: 70000 is not a conntrack zone"),
    ("", '[filter]\nno_sync_ports = ["100-20"]', "filter.no_sync_ports: '100-20' is not \"PORT\" or \"LOW-HIGH\""),

    # found by review: a superscript digit passed isdigit() and int() raised; with the defer on, the
    # delay check read the items before they were checked; true passed as label 1; "0/0" left every
    # flow out
    ('delay_by_protocol = ["\u00b2 5"]', "", "sync.delay_by_protocol: '\u00b2 5' is not"),
    ('delay_by_protocol = ["tcp"]', '[apply]\nmode = "inject"\ndefer_queue = 7', "sync.delay_by_protocol: 'tcp'"),
    ("delay_by_protocol = [6]", '[apply]\nmode = "inject"\ndefer_queue = 7', "sync.delay_by_protocol: 6 is not"),
    ("", "[filter]\nno_sync_labels = [true]", "filter.no_sync_labels: True is not a ct label bit"),
    ("", "[filter]\nno_sync_zones = [false]", "filter.no_sync_zones: False is not a conntrack zone"),
    ("", '[filter]\nno_sync_marks = ["0/0"]', "a mask of 0 would select every flow"),
])
def test_delay_coalescing_and_no_sync_keys_are_checked_in_one_line(sync: str, other: str, words: str) -> None:
    text = GOOD.replace("[sync]\n", f"[sync]\n{sync}\n", 1) + other + "\n"
    with pytest.raises(config.ConfigError) as err:
        config.parse(text, "c.toml")
    assert len(err.value.problems) == 1 and words in err.value.problems[0], err.value.problems


def test_delay_coalescing_and_no_sync_keys_reach_the_engine() -> None:
    from ctbridge.config import replication
    from ctbridge.sync.filter import NoSync
    cfg = config.parse(GOOD.replace("[sync]\n", '[sync]\ndelay = 30\ndelay_by_protocol = ["udp 2", "17 3"]\n'
                                    'coalesce = 0.01\n', 1)
                       + '[filter]\nno_sync_marks = ["0x100/0x100", "7"]\nno_sync_labels = [3]\n'
                       'no_sync_zones = [9]\nno_sync_ports = ["53", "5060-5061"]\n', "c.toml")
    engine = replication.engine_config(cfg)
    assert (engine.delay, dict(engine.delay_by_protocol), engine.coalesce) == (30.0, {17: 3.0}, 0.01)
    assert engine.filter.no_sync == NoSync(marks=((0x100, 0x100), (7, 0xFFFFFFFF)), labels=frozenset({3}),
                                           zones=frozenset({9}), ports=((53, 53), (5060, 5061)))
    assert replication.engine_config(config.parse(GOOD, "c.toml")).filter.no_sync is None
