"""Ray's fake multi-node provider for the autoscaling tests (tests/engine/test_sizing_cluster.py),
loaded by the head's autoscaler as an ``external`` provider module.

One change to Ray's: a node type's ``memory`` stays the autoscaler's to
plan with, but is not passed on to the node it starts (Ray's test provider
passes it as a custom resource, which Ray refuses: no node would start).
Each such node then has this machine's memory, as any `ray start` here.
"""

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class Provider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = {k: v for k, v in resources.items() if k != "memory"}
        super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
