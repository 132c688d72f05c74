"""RC-MAE toolkit: MAE pretraining with an EMA teacher, and the downstream suite.

One import namespace, mapped onto the repository's folders: ``rcmae.core`` (the ground floor every
package stands on), ``rcmae.pretrain`` (the method), ``rcmae.finetune``, ``rcmae.detection``,
``rcmae.robustness``, ``rcmae.tools`` (the command lines) and ``rcmae.configs`` (shipped configs).
"""
__version__ = "0.2.0"
