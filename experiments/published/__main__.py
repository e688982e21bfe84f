"""``python -m moesim.experiments.published fit|predict``."""

from moesim.experiments.published.report import main

raise SystemExit(main())
