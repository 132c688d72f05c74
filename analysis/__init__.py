"""The seed paper's analysis of the mean teacher, beside the method it studies: the linear model in
closed form (:mod:`~rcmae.analysis.linear_teacher`), the MAE / RC-MAE comparison over seeds
(:mod:`~rcmae.analysis.compare`), and the gradient probe of real checkpoints with the three sections'
driver (:mod:`~rcmae.analysis.mean_teacher`, ``tools/analyze_teacher.py``). It imports
:mod:`rcmae.pretrain`; the method never imports it."""
