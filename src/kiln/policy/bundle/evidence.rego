# Evidence on its way to the runtime. Where the runtime's nodes pull images from a
# registry ([runtime] kind = "swarm"), the gate reads each image's evidence back from
# that registry; evidence the home's store holds that did not arrive there fails the
# plan. These denies hold whatever [policy] enforce says (docs/policy.md).
package kiln.evidence

import rego.v1

deny contains msg if {
	input.evidence.error != ""
	msg := sprintf("cannot read the image's evidence from %s: %s", [input.evidence.where, input.evidence.error])
}

deny contains msg if {
	some kind in input.evidence.missing
	msg := sprintf("%s missing in the registry: looked for the referrers of %s in %s (push them with the image: kiln push without --no-referrers, or apply again)", [kind, input.evidence.where, input.evidence.looked])
}

warn contains msg if {
	some line in input.evidence.refused
	msg := sprintf("the registry served evidence that failed verification and was not read: %s", [line])
}
