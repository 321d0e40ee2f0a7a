"""The data: MNIST's IDX files (`mnist`) and how they are dealt to logical clients (`partition`)."""
