output "reserved_ip" {
  description = "The floating address clients use; the elected leader's droplet holds it."
  value       = digitalocean_reserved_ip.service.ip_address
}

output "reserved_ipv6" {
  description = "The reserved IPv6 clients use (enable_ipv6; null otherwise); the leader's droplet holds it."
  value       = var.enable_ipv6 ? digitalocean_reserved_ipv6.service[0].ip : null
}

output "droplets" {
  description = "Each member by node id: name, region, role and addresses."
  value = merge(
    { for index, droplet in digitalocean_droplet.eligible : tostring(index + 1) => {
      name         = droplet.name
      region       = droplet.region
      role         = "eligible"
      public_ipv4  = droplet.ipv4_address
      private_ipv4 = droplet.ipv4_address_private
      public_ipv6  = droplet.ipv6_address
    } },
    { "3" = {
      name         = digitalocean_droplet.witness.name
      region       = digitalocean_droplet.witness.region
      role         = "witness"
      public_ipv4  = digitalocean_droplet.witness.ipv4_address
      private_ipv4 = digitalocean_droplet.witness.ipv4_address_private
      public_ipv6  = digitalocean_droplet.witness.ipv6_address
    } },
  )
}

output "status_commands" {
  description = "Run one to see a member's view of the cluster (role, term, leader, peers, the IP)."
  value = merge(
    { for index, droplet in digitalocean_droplet.eligible :
    tostring(index + 1) => "ssh root@${droplet.ipv4_address} curl -s 127.0.0.1:${var.status_port}/status" },
    { "3" = "ssh root@${digitalocean_droplet.witness.ipv4_address} curl -s 127.0.0.1:${var.status_port}/status" },
  )
}

output "token_placement" {
  description = "What is left to do by hand when the sidecar token is not in user_data."
  value = local.sidecar_token_in_user_data ? "nothing: the sidecar token is in user_data" : join(" ; ", [
    for droplet in concat(digitalocean_droplet.eligible, [digitalocean_droplet.witness]) :
    "ssh root@${droplet.ipv4_address} 'install -m 0600 -o 10001 -g 10001 /dev/stdin /etc/fip-sidecar/do_token' < sidecar.token"
  ])
}

output "uptime_check" {
  description = "What DigitalOcean's uptime check probes (the reserved IP) and the id of its \"down\" alert."
  value = {
    target   = digitalocean_uptime_check.service.target
    alert_id = digitalocean_uptime_alert.service_down.id
  }
}

output "project_id" {
  description = "The DigitalOcean project holding the droplets and the reserved IP."
  value       = digitalocean_project.cluster.id
}
