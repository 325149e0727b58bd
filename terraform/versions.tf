terraform {
  # 1.5: `check` blocks and the current precondition/validation semantics.
  required_version = ">= 1.5"

  required_providers {
    digitalocean = {
      source = "digitalocean/digitalocean"
      # 2.21.0 added digitalocean_reserved_ip, 2.26.0 the uptime check and alert.
      version = "~> 2.26"
    }
  }
}

# This token is Terraform's own: it creates droplets, the firewall and the reserved IP. It is
# never copied to a droplet (the sidecars get var.sidecar_do_token, a narrower token).
provider "digitalocean" {
  token = var.do_token
}
