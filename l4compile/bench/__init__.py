"""``l4compile bench``: compile every backend, measure prefill and decode against the transformers baselines
(eager and torch.compile) in one run, and write report.json (schema: ``report.schema.json``), report.html and
report.md. ``l4compile bench compare A/report.json B/report.json`` prints the deltas between two runs.

Modules: ``runner`` (measurement), ``report`` (JSON, schema check, HTML/Markdown, compare), ``roofline``
(GPU figures from the model config), ``env`` (versions, CPU, GPU), ``cli`` (argparse wiring). Importing this
package is cheap: torch and matplotlib load only when a benchmark runs or a report renders."""
