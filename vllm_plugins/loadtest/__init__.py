"""Multi-tenant load tests: the spec Locust's users read (:mod:`.spec`), the headless run
(:mod:`.runner`) and the report (:mod:`.report`). The users themselves are in
:mod:`.locustfile`, which Locust runs (it reads its spec from the environment at import);
:file:`demo.toml` is the demo's load test and documents every field."""
