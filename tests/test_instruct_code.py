"""The instruct and code probes: verifiable-instruction checks on hand-written good and bad replies,
code extraction, the reference solutions passing their tests, and the sandbox — an infinite loop,
an rm -rf, network, writes and a memory bomb all score 0 and harm nothing."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest

from circuit_finder.probes import get_probe
from circuit_finder.probes.code import defines, extract_code, load_code_items
from circuit_finder.probes.instruct import CHECKS, follows
from circuit_finder.probes.sandbox import run_tests

# (check, a reply that follows it, a reply that does not)
INSTRUCTION_CASES = [
    ({"kind": "max_words", "n": 10}, "Tea came from China long ago.", "word " * 10),
    ({"kind": "min_words", "n": 5}, "one two three four five", "too short"),
    ({"kind": "sentences", "n": 2}, "Bees make honey. They store it in combs!", "One sentence only."),
    ({"kind": "paragraphs", "n": 2}, "First part.\n\nSecond part.", "Just one block\nwith a line break."),
    ({"kind": "bullets", "n": 3}, "- a\n- b\n- c", "- a\n- b"),
    ({"kind": "include", "words": ["river", "light"]}, "Light on the river.", "Light on the sea."),
    ({"kind": "exclude", "word": "very"}, "It is quite nice.", "It is very nice."),
    ({"kind": "repeat", "word": "garden", "n": 2}, "A garden, a Garden.", "One garden."),
    ({"kind": "json", "keys": ["topic", "summary"]}, '```json\n{"topic": "tea", "summary": "old"}\n```',
     '{"topic": "tea"}'),
    ({"kind": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"kind": "uppercase"}, "ALL QUIET HERE.", "ALL quiet."),
    ({"kind": "no_commas"}, "No commas at all.", "Well, some."),
    ({"kind": "first_word", "word": "Imagine"}, "Imagine a lighthouse.", "A lighthouse, imagine."),
    ({"kind": "ending", "phrase": "The end."}, "It rained. The end.", "The end. It rained."),
    ({"kind": "title"}, "<<Tides>>\nThe moon pulls.", "Tides: the moon pulls."),
    ({"kind": "quoted"}, '"All of it quoted."', 'Half "quoted".'),
]


def test_every_check_kind_has_a_case():
    assert {c["kind"] for c, _, _ in INSTRUCTION_CASES} == set(CHECKS)


@pytest.mark.parametrize("check, good, bad", INSTRUCTION_CASES, ids=[c["kind"] for c, _, _ in INSTRUCTION_CASES])
def test_instruction_checks(check, good, bad):
    assert follows(good, check), good
    assert not follows(bad, check), bad
    assert follows(f"<think>planning, lots, of, commas</think>{good}", check)  # thinking is not the reply


def test_instruct_probe_scores_share_of_instructions():
    probe = get_probe("instruct")
    assert probe.modes == ("generate",)
    item = probe.items("all")[0]
    assert [c["kind"] for c in item.data["checks"]] == ["title", "max_words", "exclude"]
    print(item.prompt, item.data["checks"])
    assert probe.score(item, "<<Sea>>\nWaves come and go.") == 100.0
    assert probe.score(item, "<<Sea>>\nWaves are very loud.") == pytest.approx(100 * 2 / 3)
    assert probe.score(item, "Waves are very loud. " + "word " * 60) == 0.0
    assert probe.score(item, "") == 0.0 and not probe.parsed(item, "") and probe.parsed(item, "hi")
    # a prompt of exactly the checks' kinds, each instruction text present
    for check in item.data["checks"]:
        params = {k: v for k, v in check.items() if k != "kind"}
        assert CHECKS[check["kind"]][0](**params) in item.prompt
    assert len(probe.items("search")) == 24 and len(probe.items("validation")) == 72


def test_instruct_items_never_ask_for_clashing_instructions():
    """No item asks for two instructions that cannot both hold: clashing kinds, or (over 100 seeds,
    where 4 items did before) an excluded word that the asked first word or ending phrase holds."""
    from circuit_finder.probes.instruct import CLASHES, make_instruct_items

    for item in get_probe("instruct").items("all"):
        kinds = [c["kind"] for c in item.data["checks"]]
        assert len(kinds) == len(set(kinds)), item.prompt
        assert not ({"lowercase", "uppercase"} <= set(kinds)), item.prompt
        for a in kinds:
            assert not (CLASHES.get(a, set()) & set(kinds)), item.prompt
    for seed in range(100):
        for item in make_instruct_items(36, seed):
            checks = item.data["checks"]
            asked = " ".join(str(c.get("word", "")) + " " + str(c.get("phrase", "")) for c in checks
                             if c["kind"] != "exclude").lower().split()
            for c in checks:
                if c["kind"] == "exclude":
                    assert c["word"] not in [w.strip(".?!,") for w in asked], item.prompt


@pytest.mark.parametrize("text, code", [
    ("```python\ndef f(x):\n    return x\n```", "def f(x):\n    return x"),
    ("Here:\n```py\nimport math\ndef f(x):\n    return x\n```\nDone.", "import math\ndef f(x):\n    return x"),
    ("```python\nprint(1)\n```\n```python\ndef f(x):\n    return 2\n```\n```\nf(1)\n```", "def f(x):\n    return 2"),
    ("def f(x):\n    return 3", "def f(x):\n    return 3"),
    ("Sure! def is a keyword.\ndef f(x):\n    return 4", "def f(x):\n    return 4"),
    ("```python\ndef f(x):\n    return 5", "def f(x):\n    return 5"),  # unclosed fence: ran out of tokens
    ("<think>```python\ndef f(x): return 0\n```</think>```python\ndef f(x):\n    return 6\n```",
     "def f(x):\n    return 6"),
    ("I cannot help with that.", ""),
    # another language's block first: its closing fence does not open the next block
    ("Example:\n```text\nf(1) -> 7\n```\n```python\ndef f(x):\n    return 7\n```", "def f(x):\n    return 7"),
    ("```bash\npip install x\n```", ""),
    ("def f(x):\n    return 8\n\nThis returns eight.", "def f(x):\n    return 8"),  # unfenced, then prose
    ("def f(x):\n    return 9\n\nFor example:\n```text\nf(1) -> 9\n```", "def f(x):\n    return 9"),
])
def test_extract_code(text, code):
    assert extract_code(text, "f") == code


def test_reference_solutions_pass_and_wrong_ones_fail():
    probe = get_probe("code")
    assert probe.modes == ("generate",)
    items = probe.items("all")
    assert len(probe.items("search")) == 20 and len(probe.items("validation")) == 40 and len(items) == 60
    t0 = time.perf_counter()
    for item in items:
        reply = f"```python\n{item.answer}```"
        assert probe.parsed(item, reply), item.id
        assert probe.score(item, reply) == 100.0, item.id
    print(f"60 reference solutions: {time.perf_counter() - t0:.2f} s in the sandbox")
    for item in items[:10]:
        signature = item.answer.splitlines()[0]
        wrong = f"```python\n{signature}\n    return None\n```"
        assert probe.parsed(item, wrong)
        assert probe.score(item, wrong) < 100.0, item.id
        assert probe.score(item, "no code here") == 0.0 and not probe.parsed(item, "no code here")


def test_data_file_tasks_are_well_formed():
    for item in load_code_items():
        assert defines(item.answer, item.data["entry_point"]), item.id
        assert 4 <= len(item.data["tests"]) <= 6 and all(t.startswith("assert ") for t in item.data["tests"])


def test_sandbox_infinite_loop_scores_zero_within_the_timeout():
    probe = get_probe("code")
    probe.timeout = 2.0
    item = probe.items()[0]
    entry = item.data["entry_point"]
    t0 = time.perf_counter()
    score = probe.score(item, f"```python\ndef {entry}(*args):\n    while True:\n        pass\n```")
    took = time.perf_counter() - t0
    print(f"infinite loop: score {score}, {took:.2f} s")
    assert score == 0.0 and took < 10
    run = run_tests("while True:\n    pass\n", ["assert True"], timeout=1.0)
    assert run.timed_out and run.passed == 0


def test_sandbox_rm_rf_and_writes_harm_nothing(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.txt").write_text("precious")
    attacks = [
        f"import shutil\nshutil.rmtree({str(keep)!r})",
        f"import os\nos.system('rm -rf {keep}')",
        f"import subprocess\nsubprocess.run(['rm', '-rf', {str(keep)!r}])",
        f"import os\nos.remove({str(keep / 'data.txt')!r})",
        f"open({str(keep / 'data.txt')!r}, 'w').write('gone')",
        f"import pathlib\npathlib.Path({str(keep / 'new.txt')!r}).write_text('x')",
        f"import os\nos.rename({str(keep)!r}, {str(tmp_path / 'moved')!r})",
        "import os\nos.kill(os.getppid(), 9)",
    ]
    for attack in attacks:
        code = f"{attack}\ndef f(x):\n    return x\n"
        run = run_tests(code, ["assert f(1) == 1"], timeout=5)
        assert run.passed == 0, attack  # the attack raised before f was defined
        inside = run_tests(f"def f(x):\n    {attack.replace(chr(10), '; ')}\n    return x\n", ["assert f(1) == 1"])
        assert inside.passed == 0, attack
    assert (keep / "data.txt").read_text() == "precious" and sorted(os.listdir(keep)) == ["data.txt"]
    assert not (tmp_path / "moved").exists()


def test_sandbox_cannot_reach_the_caller_or_make_files_elsewhere(tmp_path):
    """Calls that reach other processes or make files with no audit event are gone (pidfd_open,
    mknod, mkfifo, sched_setaffinity; signal, resource and posix refused on import), timestamps
    and extended attributes cannot be changed, and /proc (the caller's environment) cannot be
    read. This process survives every attempt; its limits and affinity stay as they were."""
    import resource

    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    before = (victim.stat().st_mtime, resource.getrlimit(resource.RLIMIT_NOFILE), os.sched_getaffinity(0))
    attacks = [
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
        "import os\nos.pidfd_open(os.getppid())",
        "import resource, os\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (8, 8))",
        "import posix, os\nposix.kill(os.getppid(), 9)",
        "import os\nos.sched_setaffinity(os.getppid(), {0})",
        f"import os, stat\nos.mknod({str(tmp_path / 'made')!r}, 0o644 | stat.S_IFREG)",
        f"import os\nos.mkfifo({str(tmp_path / 'fifo')!r})",
        f"import os\nos.utime({str(victim)!r}, (0, 0))",
        f"import os\nos.setxattr({str(victim)!r}, 'user.x', b'1')",
        # /proc (the caller's environment and command line, this process's descriptors), however spelled
        "import os\nopen(f'/proc/{os.getppid()}/environ').read()",
        "open('//proc/self/status').read()", "open('/dev/fd/../status').read()",
        "open('/proc/../proc/self/cmdline').read()", "open('../' * 12 + 'proc/self/status').read()",
        "import pathlib\npathlib.Path('/proc/self/status').read_text()", "import os\nos.open('//proc/self/environ', 0)",
        "import os\nos.listdir('/proc')",
        "import signal\nsignal.pidfd_send_signal", "import posix\nposix.kill",
    ]
    for attack in attacks:
        run = run_tests(f"{attack}\ndef f(x):\n    return x\n", ["assert f(1) == 1"], timeout=5)
        assert run.passed == 0, attack
    assert sorted(os.listdir(tmp_path)) == ["victim.txt"]
    assert (victim.stat().st_mtime, resource.getrlimit(resource.RLIMIT_NOFILE), os.sched_getaffinity(0)) == before
    fine = run_tests("import pathlib, os, shutil, tempfile, zipfile, unittest, signal, platform\n"
                     "def f(x):\n    return x + len(str(pathlib.PurePath('a', 'b'))) + 0 * os.cpu_count()",
                     ["assert f(1) == 4"])
    assert fine.passed == 1  # the standard library imports (pathlib's urllib.parse, shutil's posix, ...)


def test_sandbox_network_memory_and_exit():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    server.settimeout(0.5)
    try:
        net = run_tests(f"import socket\nsocket.create_connection(('127.0.0.1', {port}))\ndef f(): return 1",
                        ["assert f() == 1"])
        assert net.passed == 0
        with pytest.raises(OSError):  # nothing connected
            server.accept()
    finally:
        server.close()
    bomb = run_tests("def f():\n    return len(bytearray(8 * 2 ** 30))\n", ["assert f() > 0"], memory_mb=256)
    assert bomb.passed == 0 and not bomb.timed_out
    # the child's own exit ends only the child; the tests that had passed still count
    quit_early = run_tests("def f(): return 1", ["assert f() == 1", "import os; os._exit(0)", "assert True"])
    assert quit_early.passed == 1


def test_sandbox_runs_in_another_process():
    """A completion cannot reach the sweep's interpreter: its globals and modules are the child's."""
    marker = "cf_sandbox_marker"
    run_tests(f"import sys\nsys.modules['json'].{marker} = 1\ndef f(): return 1", ["assert f() == 1"])
    assert not hasattr(json, marker)
    run = run_tests("import sys\ndef f(): return sys.executable", [f"assert f() == {sys.executable!r}"])
    assert run.passed == 1  # the same Python, in a child process


def test_sandbox_print_flood_goes_nowhere():
    """A print loop fills neither the caller's memory nor its time budget; tests passed before it count."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    run = run_tests("def f():\n    while True:\n        print('x' * 100000)\n", ["assert True", "f()"], timeout=2)
    took = time.perf_counter() - t0
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"print flood: {took:.2f} s, caller grew {grew_mb:.1f} MB, {run}")
    assert run.timed_out and run.passed == 1 and took < 6 and grew_mb < 50


def test_sandbox_results_cannot_be_forged():
    """An object whose __eq__ always says True (or an int subclass doing so) passes no test; code
    that looks for the runner's token through frames (sys._getframe, a traceback's tb_frame) or the
    garbage collector finds nothing; rebinding builtins (exec, int, enumerate) or the runner's own
    names changes nothing. Right answers in subclasses of built-in types (Counter, defaultdict, a
    namedtuple, a float for an int) still pass, and namedtuple, typing and dataclasses (which peek
    at frames) still work."""
    tests = ["assert add(1, 2) == 3", "assert add(5, 5) == 10", "assert add(2, 2) == 4"]  # 0 is never right
    forge = ("while f and 'token' not in f.f_locals: f = f.f_back\n"
             "for i in range(3): f.f_locals['results'].write(f\"{f.f_locals['token']} {i} 1\\n\")\n"
             "f.f_locals['results'].flush()\ndef add(a, b): return 0\n")
    always = "class E:\n    def __eq__(s, o): return True\n"
    cases = {
        "always equal": always + "def add(a, b): return E()",
        "int subclass": "class I(int):\n    def __eq__(s, o): return True\ndef add(a, b): return I(0)",
        "in a list": always + "def add(a, b): return [E()][0]",
        "getframe": "import sys\nf = sys._getframe(0)\n" + forge,
        "traceback": "try:\n    raise ValueError\nexcept ValueError as e:\n    f = e.__traceback__.tb_frame\n" + forge,
        "gc": "import gc\nfound = gc.get_objects()\ndef add(a, b): return 0",
        "builtins.exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b): return 0",
        "builtins.int": "import builtins\nbuiltins.int = lambda x: 1\ndef add(a, b): return 0",
        "enumerate": "import builtins\nbuiltins.enumerate = lambda x: [(0, compile('pass', 'x', 'exec'))]\n"
                     "def add(a, b): return 0",
        "runner names": "import __main__\n__main__.make_plain = lambda: (lambda v: v)\n" + always +
                        "def add(a, b): return E()",
        # read the token back from the results file (by name, or through /proc), then write lines
        "results file": "import os, glob\ndef add(a, b):\n    tok = None\n"
                        "    for p in ['results.txt', '../results.txt', *glob.glob('.res*'), *glob.glob('../.res*'),\n"
                        "              *[f'{d}/{k}' for d in ('/proc/self/fd', '//proc/self/fd', '/dev/fd')\n"
                        "                for k in range(3, 16)]]:\n"
                        "        try:\n            tok = [w for w in open(p).read().split() if len(w) == 32][0]\n"
                        "        except Exception:\n            pass\n"
                        "    for fd in range(3, 64):\n        try:\n"
                        "            os.write(fd, ''.join(f'{tok} {i} 1\\n' for i in range(3)).encode())\n"
                        "        except Exception:\n            pass\n    return 0",
    }
    for name, code in cases.items():
        assert run_tests(code, tests, timeout=5).passed == 0, name
    fine = ("from collections import namedtuple\nfrom typing import TypeVar\nimport dataclasses\n"
            "P = namedtuple('P', 'x y')\nT = TypeVar('T')\n@dataclasses.dataclass\nclass D:\n    x: int\n"
            "def add(a, b): return float(P(a, b).x + D(b).x)")
    assert run_tests(fine, tests, timeout=5).passed == 3
    subclasses = ("from collections import Counter, defaultdict, namedtuple\n"
                  "def count(t): return Counter(t.split())\n"
                  "def group(ws):\n    d = defaultdict(list)\n    for w in ws: d[w[0]].append(w)\n    return d\n"
                  "def pair(): return namedtuple('P', 'a b')(1, 2)\n")
    checks = ["assert count('a b a') == {'a': 2, 'b': 1}", "assert group(['ab', 'ac', 'b']) == {'a': ['ab', 'ac'], "
              "'b': ['b']}", "assert pair() == (1, 2)", "assert count('x') != {'x': 2}"]
    assert run_tests(subclasses, checks, timeout=5).passed == 4
