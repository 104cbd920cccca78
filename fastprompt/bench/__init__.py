"""`fastprompt bench train`: training speed, fastprompt's path against the official-style path.

timing      phase clocks, the measured matmul rate, peak memory, the environment
synthetic   class names, images, JPEGs and ImageFolder trees of realistic size
stepper     one method's training steps in one style (fastprompt's train_step either way)
steps       one configuration: images/s, step breakdown, memory, FLOPs and MFU
capacity    the largest batch that fits; the prompted image encoder's MFU alone
runs        whole base-to-new runs of both styles through the protocol code
report      speed-ups, the table and the chart; reading a result back
suite       the whole benchmark (`run_bench`) and `redraw` (`fastprompt bench report`)
"""
from .report import draw_bench_chart, markdown_table, speedups
from .stepper import STYLES, Stepper, method_options
from .suite import GPU_GRID, SMOKE_GRID, BenchOptions, redraw, run_bench
from .timing import PhaseClock, is_oom, measure_matmul_rate, reset_memory

__all__ = ["draw_bench_chart", "markdown_table", "speedups", "STYLES", "Stepper", "method_options", "GPU_GRID",
           "SMOKE_GRID", "BenchOptions", "redraw", "run_bench", "PhaseClock", "is_oom", "measure_matmul_rate",
           "reset_memory"]
