"""A rehearsal of the Terraform deployment: its user_data, run in namespace droplets."""
