"""``dino-bridge report RUN_DIR``: PNG figures of a run and one HTML page that embeds them.

The pieces, in the order the command uses them:

- ``records``: read ``metrics.jsonl`` (a run still writing it included), ``config.yaml`` and the
  evaluation JSON files next to them;
- ``series``: turn the records into figure specifications (pure data). Loss terms are found by the
  naming rule of ``train/terms.py`` (term ``X`` logged as ``X``, its weight as ``X_weight``), the
  DTCH diagnostics under ``dtch/<instance>/``, online kNN under keys starting with ``knn``; every
  other numeric key lands in an "other metrics" figure, so nothing logged is left out;
- ``figures``: draw the specifications with matplotlib (Agg backend, headless);
- ``page``: the HTML page (figures by relative path, final values, evaluation results, the
  resolved config);
- ``cli``: the command.
"""

from .records import RunRecords, read_run
from .series import FigureSpec, build_figure_specs

__all__ = ["FigureSpec", "RunRecords", "build_figure_specs", "read_run"]
