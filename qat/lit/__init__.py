"""Lightning glue: the data modules, the training modules and their callbacks."""
