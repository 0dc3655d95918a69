"""The docs say what the code does: the README's test command is what CI runs."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"Install and run the test suite:\s*```bash\n(.*?)\n```", readme, re.S)
    assert block, "README.md has no test command block after 'Install and run the test suite:'"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == block.group(1).strip()
