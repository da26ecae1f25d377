"""Log lines as operators' tools read them: one line per record, journald priorities, JSON objects, colours
only on a terminal."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from loguru import logger

from daemon import logs

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def restore_loguru():
    yield
    logger.remove()
    logger.add(lambda m: None)  # quiet, as the other tests expect no handler of ours


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def emit() -> None:
    logger.info("job.queued id=a7 attempts=0")
    logger.warning("disk.low free_mb=120 folder=/srv/wan/outbox")
    logger.bind(job="a7").error("job.failed id=a7 category=timeout error=no step for 60 s\nsecond line")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("intake.error file=x.yaml error=bad value")


def journal_env(path) -> dict[str, str]:
    st = os.stat(path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def test_every_record_is_one_line_tracebacks_and_newlines_included(tmp_path):
    stream = io.StringIO()
    logs.setup("INFO", stream=stream, env={})
    emit()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[2].endswith("error=no step for 60 s\\nsecond line")
    assert "Traceback (most recent call last):\\n" in lines[3] and "ValueError: bad\\nvalue" in lines[3]
    assert not any(line.startswith("<") for line in lines)  # not under systemd: no priority prefix


def test_under_systemd_each_line_carries_its_syslog_priority(tmp_path):
    path = tmp_path / "journal-stream"
    with open(path, "w") as stream:
        logs.setup("DEBUG", stream=stream, env=journal_env(path))
        logger.debug("watch.rescan files=0")
        emit()
        logger.success("job.published id=a7")
    lines = path.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<7>", "<6>", "<4>", "<3>", "<3>", "<5>"]
    assert "\x1b[" not in path.read_text()


def test_a_journal_stream_variable_for_another_stream_is_ignored(tmp_path):
    """A child whose stderr was redirected inherits JOURNAL_STREAM; its lines must not carry prefixes."""
    other = tmp_path / "journal"
    other.write_text("")
    path = tmp_path / "redirected"
    with open(path, "w") as stream:
        logs.setup("INFO", stream=stream, env=journal_env(other))
        logger.error("job.failed id=a7")
    assert not path.read_text().startswith("<")
    assert logs.stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": "garbage"}) is False


def test_json_lines_name_the_event_and_its_fields(tmp_path):
    stream = io.StringIO()
    logs.setup("INFO", "json", stream=stream, env={})
    emit()
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(docs) == 4
    assert docs[0]["event"] == "job.queued" and docs[0]["id"] == "a7" and docs[0]["attempts"] == "0"
    assert docs[0]["level"] == "INFO" and re.match(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d$", docs[0]["time"]
    )
    assert docs[1]["folder"] == "/srv/wan/outbox"
    assert docs[2]["error"] == "no step for 60 s\nsecond line" and docs[2]["job"] == "a7"
    assert docs[2]["category"] == "timeout"
    assert docs[3]["event"] == "intake.error" and "ValueError: bad" in docs[3]["exception"]


def test_json_lines_under_systemd_keep_the_prefix_outside_the_object(tmp_path):
    path = tmp_path / "journal-stream"
    with open(path, "w") as stream:
        logs.setup("INFO", "json", stream=stream, env=journal_env(path))
        logger.error("job.failed id=a7")
    line = path.read_text().splitlines()[0]
    assert line.startswith("<3>{") and json.loads(line[3:])["event"] == "job.failed"


@pytest.mark.parametrize(
    ("message", "event", "fields"),
    [
        (
            "daemon.recovered queued=3 records=5 seconds=0.20",
            "daemon.recovered",
            {"queued": "3", "records": "5", "seconds": "0.20"},
        ),
        (
            "lease.lost owner=alpha: another daemon took over",
            "lease.lost",
            {"owner": "alpha: another daemon took over"},
        ),
        ("a plain sentence = not an event", None, {}),
        ("job.claimed file=a b.yaml", "job.claimed", {"file": "a b.yaml"}),
    ],
)
def test_event_and_fields_are_read_from_the_message(message, event, fields):
    assert logs.event_fields(message) == (event, fields)


def test_colours_only_on_a_terminal_and_never_with_no_color():
    tty = Terminal()
    logs.setup("INFO", stream=tty, env={})
    logger.error("job.failed id=a7\nmore")
    assert ANSI.search(tty.getvalue()) and len(tty.getvalue().splitlines()) == 1
    tty = Terminal()
    logs.setup("INFO", stream=tty, env={"NO_COLOR": "1"})
    logger.error("job.failed id=a7")
    assert not ANSI.search(tty.getvalue()) and "job.failed id=a7" in tty.getvalue()
    piped = io.StringIO()
    logs.setup("INFO", stream=piped, env={})
    logger.error("job.failed id=a7")
    assert not ANSI.search(piped.getvalue())


def test_a_worker_names_itself_in_each_line():
    stream = io.StringIO()
    logs.setup("INFO", stream=stream, env={}, tag="worker[42]")
    logger.info("worker.ready device=cpu")
    assert " | worker[42] | worker.ready device=cpu" in stream.getvalue()
    stream = io.StringIO()
    logs.setup("INFO", "json", stream=stream, env={}, tag="worker[42]")
    logger.info("worker.ready device=cpu")
    assert json.loads(stream.getvalue())["process"] == "worker[42]"
