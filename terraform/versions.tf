terraform {
  # 1.5: `check` blocks and the current precondition/validation semantics.
  required_version = ">= 1.5"

  required_providers {
    digitalocean = {
      source  = "digitalocean/digitalocean"
      version = "~> 2.0"
    }
  }
}

# This token is Terraform's own: it creates droplets, the firewall and the reserved IP. It is
# never copied to a droplet (the sidecars get var.sidecar_do_token, a narrower token).
provider "digitalocean" {
  token = var.do_token
}
