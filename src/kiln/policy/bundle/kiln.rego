# The default policy bundle shipped with Kiln. Its rules are warnings unless
# [policy] enforce = true in kiln.toml; input is one service's evidence
# (docs/policy.md lists every field).
package kiln.default

import rego.v1

deny contains msg if {
	not input.image.pinned
	msg := sprintf("image %s is not pinned by a digest in the image store", [input.image.ref])
}

deny contains msg if {
	count(input.settings.sources) > 0
	not allowed_source
	msg := sprintf("image base %s is not an allowed source ([policy] sources)", [shown_base])
}

shown_base := input.image.base if input.image.base != ""

shown_base := "unknown (no signed provenance)" if input.image.base == ""

allowed_source if {
	some pattern in input.settings.sources
	glob.match(pattern, [], input.image.base)
}

deny contains msg if {
	count(input.settings.keys) == 0
	msg := "no trusted key: list public keys in [policy] keys to check signatures"
}

deny contains msg if {
	count(input.settings.keys) > 0
	not input.signature.signed
	msg := sprintf("image %s is not signed by a trusted key", [input.image.digest])
}

deny contains msg if {
	some finding in input.scan.findings
	finding.severity == "CRITICAL"
	finding.fixed != null
	msg := sprintf("critical %s in %s %s, fixed in %s", [finding.id, finding.package, finding.installed, finding.fixed])
}

deny contains msg if {
	input.settings.max_image_age_seconds
	input.image.age_seconds > input.settings.max_image_age_seconds
	msg := sprintf("image is %d days old, more than max_image_age %s: bake it again", [floor(input.image.age_seconds / 86400), input.settings.max_image_age])
}

deny contains msg if {
	input.secrets.found
	msg := "a secret was found in the image"
}

deny contains msg if {
	input.spec.health.http == null
	input.spec.health.exec == null
	input.spec.health.tcp == false
	not input.image.healthcheck
	msg := "no health check: set [services.NAME.health] or the image's healthcheck"
}

deny contains msg if {
	root_user
	msg := sprintf("runs as root (image user %s): set user in the image recipe", [shown_user])
}

shown_user := input.image.user if input.image.user != ""

shown_user := "unset" if input.image.user == ""

root_user if input.image.user in {"", "root", "0"}

root_user if startswith(input.image.user, "0:")

root_user if startswith(input.image.user, "root:")

warn contains msg if {
	input.scan.status == "no-database"
	msg := "no vulnerability database: run kiln scan db import PATH"
}
