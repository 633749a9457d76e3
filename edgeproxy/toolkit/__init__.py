"""The operator's everyday toolkit (nginx's add_header, proxy_set_header,
rewrite, return, error_page, auth_basic) as compiled phases: config readers
(config.py), htpasswd checks (auth.py) and the makers that build each
route's phases (phases.py); the phases themselves are ext/toolkit.pyx."""
