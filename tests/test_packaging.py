"""chatq installs under one `chatq` namespace and coexists with other packages.

The top-level folders (config/, shared/, supervisor/, tenant_worker/) are
installed as chatq.config, chatq.shared, ...: supervisord's `supervisor`
package and a user's `config.py` or `shared.py` handler module keep their
own names.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from sandbox import clean_env

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("config", "shared", "supervisor", "tenant_worker")


def run_python(code: str, cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_user_modules_named_config_and_shared_are_the_handlers(tmp_path: Path) -> None:
    for name in ("config", "shared"):
        (tmp_path / f"{name}.py").write_text(
            f"async def reply(message, ctx):\n    return '{name}: ' + message.text\n"
        )
    done = run_python(
        """
        import asyncio
        from chatq.config.settings import TenantConfig
        from chatq.tenant_worker.handlers import load_handler
        from chatq.tenant_worker.messages import Message

        async def main():
            for name in ("config", "shared"):
                handler = load_handler(TenantConfig(id="t", handler=f"{name}:reply"))
                message = Message(id="1", chat_id="c", text="hi", tenant_id="t")
                print(await handler.handle(message, None))

        asyncio.run(main())
        """,
        cwd=tmp_path,
        pythonpath=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["['config: hi']", "['shared: hi']"]


def test_supervisord_package_beside_chatq(tmp_path: Path) -> None:
    """A `supervisor` package (as supervisord installs it) and chatq's CLI both work."""
    package = tmp_path / "site" / "supervisor"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "supervisord.py").write_text("NAME = 'supervisord'\n")
    done = run_python(
        """
        import supervisor.supervisord
        from chatq.supervisor import cli
        print(supervisor.supervisord.NAME, cli.__name__)
        """,
        cwd=tmp_path,
        pythonpath=tmp_path / "site",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["supervisord", "chatq.supervisor.cli"]


@pytest.mark.timeout(240)
def test_the_wheel_holds_only_the_chatq_namespace(tmp_path: Path) -> None:
    """Nothing installed outside chatq/: `pip uninstall supervisor` cannot touch chatq."""
    source = tmp_path / "src"
    source.mkdir()
    skip = shutil.ignore_patterns("__pycache__")
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, source / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    if built.returncode != 0 and "No matching distribution" in built.stderr:
        pytest.skip("no package index to build the wheel")
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("chatq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"chatq"}
    for folder in FOLDERS:
        assert f"chatq/{folder}/__init__.py" in names
    assert "chatq/config/tenants.toml" in names
