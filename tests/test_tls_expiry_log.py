"""A certificate's expiry warning is logged once per load: by the supervisor that loads it,
not again by each worker's first daily check (a real supervisor with two workers)."""
from __future__ import annotations

import datetime as dt
import time

from tlsutil import CA, NOW


def test_expiry_warning_is_logged_once_with_two_workers(tmp_path, origin, proxy_factory):
    soon = NOW + dt.timedelta(days=5)
    cfg = CA().issue("localhost", not_before=soon - dt.timedelta(days=90),
                     not_after=soon).write(tmp_path, "soon")
    proxy = proxy_factory(
        f'[server]\nworkers = 2\npid_file = "{tmp_path}/edgeproxy.pid"\n\n'
        f'[[route]]\npath = "/"\npool = "web"\n\n[pool.web]\nbackends = ["{origin.url}"]\n',
        listen_lines=[f'tls.certs = [{{ cert = "{cfg.cert}", key = "{cfg.key}" }}]'])
    time.sleep(3)      # several ticks of both workers: the old daily check ran on the first
    proxy.stop()
    warnings = [line for line in proxy.log().splitlines() if "the certificate expires on" in line]
    assert len(warnings) == 1, warnings
    assert f"{cfg.cert}: the certificate expires on {soon:%Y-%m-%d}" in warnings[0]
