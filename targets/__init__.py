"""Target profiles: what each device needs and its accuracy-drift budget."""
