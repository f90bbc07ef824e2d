"""The offline demos' builders: the tiny specialists (`specialists`), the toy seeds (`toy`), the tiny diffusers
pipelines (`tiny_pipelines`), the text-to-image world (`t2i_world`, on `shapes_world` and `t2i_training`), the
Python fitness tasks (`tasks.digits`, `tasks.likelihood`), and the builders' shared cache (`build_cache`).

Nothing in the library imports this package, except the app (the bundled specialists) and the specs that name its
callables. The old paths (`hf_m2n2.specialists`, `hf_m2n2.toy`, `hf_m2n2.tasks.*`) stay as aliases of these modules.
"""
