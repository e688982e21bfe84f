"""Published measurements of MoE offloading systems as data, and moesim's predictions of them.

One YAML per source in this folder (``entries``); ``predict`` maps an entry to one simulation;
``fit`` is the calibration protocol (declared calibration sets, never judged on); ``report``
writes the tables of the docs page "Predicting published systems".
"""
