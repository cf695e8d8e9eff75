"""The failure summary of a deploy quotes the failing revision's run only (issue 19, item 2):
real processes, a real Prefect server, the deploy-stack flow end to end."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hxp.backends.base import Remove, UnitRef
from hxp.backends.process import ProcessBackend
from hxp.errors import DeployError
from tests.support.stacks import free_port, web_stack

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

# A server that says which revision it is before it serves.
SAYS = (
    "services:\n  api:\n    command: [{py}, -c, \"print('written by revision {rev}', flush=True); "
    "import http.server as h; "
    "h.HTTPServer(('127.0.0.1', {port}), h.SimpleHTTPRequestHandler).serve_forever()\"]\n"
)
NEVER_READY = (
    "    health:\n      http: {{url: 'http://127.0.0.1:{dead}/'}}\n      start_period: 0s\n"
)


def test_the_summary_of_a_failed_revision_quotes_none_of_the_one_before(tmp_path: Path) -> None:
    from flows.deploy import deploy_stack

    path, ports, state = *web_stack(tmp_path), tmp_path / "state"
    good = tmp_path / "good.yaml"
    good.write_text(SAYS.format(py=sys.executable, rev=1, port=ports["api"]))
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        SAYS.format(py=sys.executable, rev=2, port=ports["api"])
        + NEVER_READY.format(dead=free_port())
    )
    try:
        deploy_stack([str(path), str(good)], state_dir=str(state))
        log = (state / "process/t/api/output.log").read_text()
        assert "written by revision 1" in log  # the earlier revision's line is in the log file
        with pytest.raises(DeployError) as err:
            deploy_stack([str(path), str(bad)], state_dir=str(state))
        summary = str(err.value)
        assert "failed at api@local" in summary
        assert "log lines of api:" in summary
        assert "  | written by revision 2" in summary
        assert "written by revision 1" not in summary
    finally:
        backend = ProcessBackend(state)
        for name in backend.observe("t"):
            backend.apply(Remove(UnitRef("t", name, name)))
