def add_bench_args(p):
    p.add_argument("what", choices=["data", "step", "e2e"])
    p.add_argument("--json")


def run_bench(args):
    raise NotImplementedError
