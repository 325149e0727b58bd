# One cloud firewall for the three droplets. DigitalOcean firewalls are stateful: replies to
# allowed connections need no rule of their own.

locals {
  cluster_droplet_ids = concat(digitalocean_droplet.eligible[*].id, [digitalocean_droplet.witness.id])
  anywhere            = ["0.0.0.0/0", "::/0"]
}

resource "digitalocean_firewall" "cluster" {
  name        = "${var.name_prefix}-cluster"
  droplet_ids = local.cluster_droplet_ids

  # Election traffic only between members. Sources are droplet ids, which cover both the
  # private addresses (eligible pair, same region VPC) and the public ones (the witness is in
  # another region, and VPCs are regional, so it reaches the others over public addresses).
  inbound_rule {
    protocol           = "udp"
    port_range         = tostring(var.election_port)
    source_droplet_ids = local.cluster_droplet_ids
  }

  # The service behind the reserved IP.
  inbound_rule {
    protocol         = "tcp"
    port_range       = "80"
    source_addresses = local.anywhere
  }

  inbound_rule {
    protocol         = "tcp"
    port_range       = "443"
    source_addresses = local.anywhere
  }

  # Administration only from the operator's network.
  inbound_rule {
    protocol         = "tcp"
    port_range       = "22"
    source_addresses = [var.admin_cidr]
  }

  # ICMP between members and from the operator: ping and path-MTU discovery for diagnosis.
  inbound_rule {
    protocol           = "icmp"
    source_droplet_ids = local.cluster_droplet_ids
    source_addresses   = [var.admin_cidr]
  }

  outbound_rule {
    protocol                = "udp"
    port_range              = tostring(var.election_port)
    destination_droplet_ids = local.cluster_droplet_ids
  }

  # DNS.
  outbound_rule {
    protocol              = "udp"
    port_range            = "53"
    destination_addresses = local.anywhere
  }

  outbound_rule {
    protocol              = "tcp"
    port_range            = "53"
    destination_addresses = local.anywhere
  }

  # HTTPS: the DigitalOcean API and container registries.
  outbound_rule {
    protocol              = "tcp"
    port_range            = "443"
    destination_addresses = local.anywhere
  }

  # HTTP: the distribution's package mirrors (cloud-init installs Docker; apt verifies
  # packages by signature, not by transport).
  outbound_rule {
    protocol              = "tcp"
    port_range            = "80"
    destination_addresses = local.anywhere
  }

  # NTP: the leases assume clocks whose rates are sane; keep timesyncd working.
  outbound_rule {
    protocol              = "udp"
    port_range            = "123"
    destination_addresses = local.anywhere
  }

  outbound_rule {
    protocol              = "icmp"
    destination_addresses = local.anywhere
  }
}
