"""Tools over the library, never imported by it: the command line (cli: replay, bench,
summary, plot), workload reading (workload), native replay (replay), the benchmark suite
(bench_suite), the snapshot commands (snapshot_cli), the visualizer checker
(viz_check) and the memory-debugging commands (analysis_cli: fit and its engine, sweep,
diff, ranks). They sit in the top layer: they rely on any module of mtia_alloc, and the library
relies on none of them. This file owns nothing else."""
