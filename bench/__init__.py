"""Benchmarks: flipvisor measured side by side with supervisord and Circus.

Run ``python3 -m bench.run [--quick] [--only b,e,a,d,c,f] [--repeat N]``.
"""
