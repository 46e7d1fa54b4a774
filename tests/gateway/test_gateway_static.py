"""The chat page's files: everything index.html and its modules load is served, also when the API
needs a key (the page itself asks for the key), and nothing comes from another origin."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from tests.gateway.fakes import GatewayFactory

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef,import-not-found]

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "services" / "gateway"


async def test_chat_page_assets_are_served_without_key(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(api_key="secret")
    status, page = await gateway.get("/")
    assert status == 200
    html = page.decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/static/") for a in assets), "no CDN: every asset is local"
    modules = [a for a in assets if a.startswith("/static/js/")]
    seen = set()
    while modules:  # follow the ES module imports
        path = modules.pop()
        if path in seen:
            continue
        seen.add(path)
        status, body = await gateway.get(path)
        assert status == 200, path
        modules += ["/static/js/" + m for m in re.findall(r'from "\./([\w.]+)"', body.decode())]
    assert {"/static/js/app.js", "/static/js/markdown.js", "/static/js/api.js"} <= seen
    for path in assets:
        status, _ = await gateway.get(path)
        assert status == 200, path
    status, _ = await gateway.get("/v1/models")
    assert status == 401
    status, _ = await gateway.get("/static/../app.py")
    assert status == 404


def test_package_data_ships_every_static_file() -> None:
    """setuptools' package-data globs do not recurse: each static subfolder needs its own."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = [PurePosixPath(g) for g in pyproject["tool"]["setuptools"]["package-data"]["services.gateway"]]
    files = [PurePosixPath(p.relative_to(GATEWAY).as_posix()) for p in (GATEWAY / "static").rglob("*") if p.is_file()]
    assert len(files) > 10
    for f in files:
        assert any(len(g.parts) == len(f.parts) and f.match(str(g)) for g in globs), f"{f} is not in the wheel"
