"""Small built-in tasks whose Python fitness functions drive `hf-m2n2 evolve` (e.g. `hf_m2n2.demo.tasks.digits`)."""
