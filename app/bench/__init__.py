"""`loop-lab bench` and `loop-lab compare`: run locust scenarios against a server and report.

Needs the `load` extra (locust, matplotlib, rich); the server itself never imports this package.
"""
