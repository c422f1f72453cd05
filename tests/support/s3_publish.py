#!/usr/bin/env python3
"""Publish a file:// binary cache to an S3 API server that checks signatures.

    s3_publish.py ENDPOINT BUCKET DIR

Against moto's server (started without authentication): creates an IAM
user with an access key allowed s3:*, turns authentication on
(POST /moto-api/reset-auth 0: from then on every request's SigV4
signature is recomputed with the user's secret and compared), then
creates BUCKET and uploads every file under DIR with boto3, the standard
S3 client, signing with that key. Prints "ACCESS_KEY_ID SECRET_ACCESS_KEY".
"""
import json
import os
import sys
import urllib.request

import boto3
from botocore.config import Config

endpoint, bucket, root = sys.argv[1:4]
anon = dict(endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="cache-reader")
key = iam.create_access_key(UserName="cache-reader")["AccessKey"]
iam.put_user_policy(
    UserName="cache-reader",
    PolicyName="s3",
    PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }),
)
req = urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                             headers={"Content-Type": "text/plain"})
urllib.request.urlopen(req).read()

s3 = boto3.client(
    "s3", endpoint_url=endpoint, region_name="us-east-1",
    aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"],
    config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"),
)
s3.create_bucket(Bucket=bucket)
n = 0
for dirpath, _, files in os.walk(root):
    for f in files:
        path = os.path.join(dirpath, f)
        s3.upload_file(path, bucket, os.path.relpath(path, root))
        n += 1
print(key["AccessKeyId"], key["SecretAccessKey"])
print(f"uploaded {n} files", file=sys.stderr)
