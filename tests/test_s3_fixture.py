def test_real_seaweedfs_round_trip(s3):
    c = s3.client()
    c.put_object(Bucket=s3.bucket, Key="probe/x.txt", Body=b"hello")
    assert c.get_object(Bucket=s3.bucket, Key="probe/x.txt")["Body"].read() == b"hello"
    assert "secret" not in repr(s3) and s3.secret_key not in repr(s3)
