"""The README's Python examples run as written (one namespace, in order)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    namespace: dict = {"__name__": "__main__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Flat(stabilizer=1e-06)" in printed and "BatchNorm_0" in printed


def test_readme_rule_table_is_what_the_code_prints(capsys):
    text = README.read_text()
    first = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    exec(compile(first, str(README), "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out.strip()
    shown = re.search(r"`rule_table` prints.*?```\n(.*?)```", text, flags=re.S).group(1).strip()
    assert shown == printed
