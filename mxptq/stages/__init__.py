"""Pipeline stages, each `stage(model, recipe, ctx) -> model` (DESIGN.md "The pipeline"):
`transform.quantize_model`, `gptq.run_gptq`, `rotsearch.run_rotation_search`. Import the module
of the stage you run; nothing is imported here, so loading one stage never pulls in the others."""
