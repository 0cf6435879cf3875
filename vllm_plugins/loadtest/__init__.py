"""Multi-tenant load tests: the spec Locust's users read (:mod:`.spec`), the headless run
(:mod:`.runner`) and the report (:mod:`.report`). The users themselves are in
``loadtests/locustfile.py``."""
