"""What the AWS SDK for Python (boto3) does against culvert-relay's AWS API, unmodified: tags,
pagination by nextToken, timestamps, and the refusals AWS gives for a missing
tunnel, a wrong secret, an unknown key, a skewed clock, a replayed signature and an operator
outside their grant. It prints what it saw as one JSON object; tests/tests/aws_api.rs checks it.

Environment: client.env of a dev relay (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_CA_BUNDLE, CULVERT_AWS_ENDPOINT), THING (granted to the operator),
OTHER_THING (not granted), OPERATOR_KEY_ID and OPERATOR_SECRET (the operator's AWS pair).
"""

import datetime
import json
import os

import boto3
import botocore.auth
import botocore.config
import botocore.exceptions
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ENDPOINT = os.environ["CULVERT_AWS_ENDPOINT"]
REGION = os.environ["AWS_DEFAULT_REGION"]
CA = os.environ["AWS_CA_BUNDLE"]
THING = os.environ["THING"]
OTHER = os.environ["OTHER_THING"]


def client(key=None, secret=None):
    creds = {}
    if key is not None:
        creds = {"aws_access_key_id": key, "aws_secret_access_key": secret}
    return boto3.client(
        "iotsecuretunneling",
        endpoint_url=ENDPOINT,
        region_name=REGION,
        verify=CA,
        # A refusal is reported at once, not retried.
        config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}),
        **creds,
    )


def error_of(call):
    """AWS's error code, HTTP status and message of a call that must fail."""
    try:
        call()
    except botocore.exceptions.ClientError as e:
        return {
            "code": e.response["Error"]["Code"],
            "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
            "message": e.response["Error"]["Message"],
        }
    return None


def tag_pairs(tags):
    return sorted([t["key"], t["value"]] for t in tags)


out = {}
admin = client()

opened = []
for i in range(5):
    t = admin.open_tunnel(
        destinationConfig={"thingName": THING, "services": ["SSH"]},
        tags=[{"key": "n", "value": str(i)}],
        timeoutConfig={"maxLifetimeTimeoutMinutes": 30},
    )
    opened.append(t["tunnelId"])
out["opened"] = opened
# botocore defines no paginator for this service: scripts follow nextToken themselves.
pages, token = [], None
for _ in range(10):
    page = admin.list_tunnels(thingName=THING, maxResults=2, **({"nextToken": token} if token else {}))
    pages.append([t["tunnelId"] for t in page["tunnelSummaries"]])
    token = page.get("nextToken")
    if not token:
        break
out["pages"] = pages

described = admin.describe_tunnel(tunnelId=opened[0])["tunnel"]
arn = described["tunnelArn"]
out["arn"] = arn
out["created_at_is_a_datetime"] = isinstance(described["createdAt"], datetime.datetime)
out["lifetime"] = described["timeoutConfig"]["maxLifetimeTimeoutMinutes"]
admin.tag_resource(
    resourceArn=arn,
    tags=[{"key": "site", "value": "lab-2"}, {"key": "owner", "value": "équipe maintenance"}],
)
admin.untag_resource(resourceArn=arn, tagKeys=["n"])
out["tags"] = tag_pairs(admin.list_tags_for_resource(resourceArn=arn)["tags"])
out["described_tags"] = tag_pairs(admin.describe_tunnel(tunnelId=opened[0])["tunnel"]["tags"])

out["missing"] = error_of(lambda: admin.describe_tunnel(tunnelId="no-such-tunnel"))
out["wrong_secret"] = error_of(
    lambda: client(os.environ["AWS_ACCESS_KEY_ID"], "x" * 40).list_tunnels()
)
out["unknown_key"] = error_of(lambda: client("CKIA000000000000", "x" * 40).list_tunnels())

# A clock ten minutes slow: botocore signs with the time it reads here.
real_now = botocore.auth.get_current_datetime
botocore.auth.get_current_datetime = lambda remove_tzinfo=True: real_now(
    remove_tzinfo
) - datetime.timedelta(minutes=10)
try:
    out["skewed"] = error_of(lambda: client().list_tunnels())
finally:
    botocore.auth.get_current_datetime = real_now

# One signed CloseTunnel, sent twice byte for byte.
creds = Credentials(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
req = AWSRequest(
    method="POST",
    url=ENDPOINT + "/",
    data=json.dumps({"tunnelId": opened[1]}),
    headers={
        "X-Amz-Target": "IoTSecuredTunneling.CloseTunnel",
        "Content-Type": "application/x-amz-json-1.1",
    },
)
SigV4Auth(creds, "IoTSecuredTunneling", REGION).add_auth(req)
prepared = req.prepare()
http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=CA)
first = http.request("POST", prepared.url, body=prepared.body, headers=dict(prepared.headers))
again = http.request("POST", prepared.url, body=prepared.body, headers=dict(prepared.headers))
out["replay"] = {
    "first": first.status,
    "again": again.status,
    "again_body": json.loads(again.data),
}

operator = client(os.environ["OPERATOR_KEY_ID"], os.environ["OPERATOR_SECRET"])
out["operator_outside_grant"] = error_of(
    lambda: operator.open_tunnel(destinationConfig={"thingName": OTHER, "services": ["SSH"]})
)
out["operator_other_service"] = error_of(
    lambda: operator.open_tunnel(destinationConfig={"thingName": THING, "services": ["VNC"]})
)
other = admin.open_tunnel(destinationConfig={"thingName": OTHER, "services": ["SSH"]})
out["operator_closes_outside_grant"] = error_of(
    lambda: operator.close_tunnel(tunnelId=other["tunnelId"])
)
out["operator_inside_grant"] = operator.open_tunnel(
    destinationConfig={"thingName": THING, "services": ["SSH"]}
)["tunnelId"]
out["operator_sees"] = sorted(t["tunnelId"] for t in operator.list_tunnels()["tunnelSummaries"])
out["other_tunnel"] = other["tunnelId"]

print(json.dumps(out))
