"""The paper's experiments, one command each (``python -m resnet_jax.experiments <command>``).

* ``depth``: the Fig. 6 / Table 6 depth study (plain vs residual nets, one recipe) ->
  ``W/<arch>/`` runs, ``W/fig6.png``, ``W/depth.md``, ``W/depth.csv``  (:mod:`.depth`).
* ``responses``: Fig. 7 layer-response stds of the trained nets of ``W`` -> ``W/fig7.png``,
  ``W/responses.csv``  (:mod:`.responses`).
* ``tables``: Table 1 and Table 6's architecture columns from the code -> ``DIR/tables.md``,
  ``DIR/table1.csv``, ``DIR/table6.csv``  (:mod:`.tables`).
"""
