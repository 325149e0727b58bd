# Three droplets: node 1 and node 2 (eligible, in the primary region, where the reserved IP
# lives) and node 3, the witness, in another region (it votes but never leads, so losing the
# primary region's network to one droplet still leaves a majority). Node ids are these fixed
# config values, never droplet ids: recreating a droplet must not change who may lead.

locals {
  cluster_tag = "${var.name_prefix}-cluster"
  members = {
    "1" = { eligible = true }
    "2" = { eligible = true }
    "3" = { eligible = false }
  }
  sidecar_token_in_user_data = var.template_sidecar_token && var.sidecar_do_token != ""
  configure_script           = file("${path.module}/files/configure_sidecar.py")

  # Everything a node needs to write its own config, except the peers' addresses, which
  # configure_sidecar.py looks up by tag at boot (templating them here would make a cycle).
  cluster_settings = {
    cluster_tag   = local.cluster_tag
    members       = local.members
    election_port = var.election_port
    status_listen = "127.0.0.1:${var.status_port}"
    profile       = var.timing_profile
    reserved_ip   = digitalocean_reserved_ip.service.ip_address
    api_url       = "https://api.digitalocean.com"
    token_file    = "/etc/fip-sidecar/do_token"
    config_file   = "/etc/fip-sidecar/config.toml"
  }
}

resource "digitalocean_tag" "cluster" {
  name = local.cluster_tag
}

resource "digitalocean_tag" "node" {
  for_each = local.members
  name     = "${local.cluster_tag}-node-${each.key}"
}

# The reserved IP is created with a region only. Setting droplet_id here, or adding a
# digitalocean_reserved_ip_assignment resource, would make Terraform the owner of the
# assignment: after every failover the next `terraform apply` would move the IP back to the
# droplet named in the configuration. The sidecars own the assignment; the leader assigns it.
resource "digitalocean_reserved_ip" "service" {
  region = var.primary_region

  lifecycle {
    # The address is what clients and DNS point at; losing it is an outage that outlives
    # the stack. Remove this line deliberately (and first) to destroy it.
    prevent_destroy = true
  }
}

resource "digitalocean_droplet" "eligible" {
  #checkov:skip=CKV_DIO_2:ssh_keys is var.ssh_key_fingerprints, a required variable validated non-empty; checkov cannot resolve it
  count = 2

  name       = "${var.name_prefix}-node-${count.index + 1}"
  region     = var.primary_region
  size       = var.droplet_size
  image      = var.droplet_image
  ssh_keys   = var.ssh_key_fingerprints
  monitoring = true
  ipv6       = true
  tags = [
    digitalocean_tag.cluster.id,
    digitalocean_tag.node[tostring(count.index + 1)].id,
  ]

  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    cluster_json       = jsonencode(merge(local.cluster_settings, { node_id = count.index + 1, health_url = "http://127.0.0.1:${var.web_port}${var.health_path}" }))
    cluster_key        = trimspace(var.cluster_key)
    token_in_user_data = local.sidecar_token_in_user_data
    sidecar_do_token   = local.sidecar_token_in_user_data ? trimspace(var.sidecar_do_token) : ""
    sidecar_image      = var.sidecar_image
    run_web            = true
    web_image          = var.web_image
    configure_script   = local.configure_script
  })

  lifecycle {
    # user_data is only read at first boot, and changing it forces a new droplet. Ignoring
    # it keeps a token rotation or an image bump from recreating all three droplets at once
    # (an outage); roll such changes one node at a time with
    # `terraform apply -replace='digitalocean_droplet.eligible[1]'`.
    ignore_changes = [user_data]

    precondition {
      condition     = !var.template_sidecar_token || var.sidecar_do_token != ""
      error_message = "sidecar_do_token is empty: set it, or set template_sidecar_token = false and place /etc/fip-sidecar/do_token on each droplet yourself."
    }
  }
}

resource "digitalocean_droplet" "witness" {
  #checkov:skip=CKV_DIO_2:ssh_keys is var.ssh_key_fingerprints, a required variable validated non-empty; checkov cannot resolve it
  name       = "${var.name_prefix}-witness-3"
  region     = var.witness_region
  size       = var.droplet_size
  image      = var.droplet_image
  ssh_keys   = var.ssh_key_fingerprints
  monitoring = true
  ipv6       = true
  tags = [
    digitalocean_tag.cluster.id,
    digitalocean_tag.node["3"].id,
  ]

  # The witness runs no web service and needs no health check (it never leads); it still
  # needs the token, with droplet:read, to look up the other members' addresses.
  user_data = templatefile("${path.module}/cloud-init.yaml.tftpl", {
    cluster_json       = jsonencode(merge(local.cluster_settings, { node_id = 3, health_url = "" }))
    cluster_key        = trimspace(var.cluster_key)
    token_in_user_data = local.sidecar_token_in_user_data
    sidecar_do_token   = local.sidecar_token_in_user_data ? trimspace(var.sidecar_do_token) : ""
    sidecar_image      = var.sidecar_image
    run_web            = false
    web_image          = var.web_image
    configure_script   = local.configure_script
  })

  lifecycle {
    ignore_changes = [user_data]

    precondition {
      condition     = var.witness_region != var.primary_region
      error_message = "witness_region must differ from primary_region: a witness in the same region fails together with the eligible pair."
    }
  }
}
