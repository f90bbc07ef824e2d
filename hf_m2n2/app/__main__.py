"""`python -m hf_m2n2.app`: serve the Gradio app (see `hf_m2n2.app.main`)."""

from hf_m2n2.app import main

raise SystemExit(main())
